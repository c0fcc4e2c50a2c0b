"""Checkpoints that cannot lie: manifests with sizes and checksums, and resume that skips what does not match."""

import json

import pytest

from rlhf_ray.checkpoints import CheckpointError, commit, newest_valid, problem_with, prune, write_manifest
from rlhf_ray.config import load_config
from rlhf_ray.ppo.run import files_a_resume_reads, find_resume_checkpoint

pytestmark = pytest.mark.unit

IDENTITY = {
    "policy_model": "/models/a",
    "policy_config_sha256": "abc",
    "lora_r": 8,
    "lora_target_modules": ["q_proj"],
    "learner_backend": "torch",
    "advantage_estimator": "gae",
}


def make_checkpoint(folder, iteration, identity=IDENTITY):
    staging = folder / f".tmp-iter_{iteration:06d}"
    (staging / "adapter").mkdir(parents=True)
    (staging / "adapter" / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 40)
    (staging / "driver_state.json").write_text(json.dumps({"iteration": iteration}))
    write_manifest(staging, {"iteration": iteration, **identity})
    return commit(staging, folder / f"iter_{iteration:06d}")


def truncate(checkpoint):
    path = checkpoint / "adapter" / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])


def delete_manifest(checkpoint):
    (checkpoint / "manifest.json").unlink()


def flip_bytes(checkpoint):
    path = checkpoint / "adapter" / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[500] ^= 0xFF
    path.write_bytes(bytes(data))  # same size: only the checksum can tell


def rewrite_manifest(change):
    def damage(checkpoint):
        path = checkpoint / "manifest.json"
        path.write_text(json.dumps(change(json.loads(path.read_text()))))

    return damage


def without_sha256(manifest):
    for entry in manifest["files"].values():
        del entry["sha256"]
    return manifest


CORRUPTIONS = {
    "truncated file": (truncate, "has 1000 bytes, the manifest says 10240"),
    "manifest deleted": (delete_manifest, "no manifest.json"),
    "flipped byte": (flip_bytes, "does not match its SHA-256"),
    "manifest is a list": (rewrite_manifest(lambda m: []), "manifest.json is not a JSON object"),
    "manifest without files": (rewrite_manifest(lambda m: {"iteration": 4}), "manifest.json has no `files` object"),
    "entry without sha256": (rewrite_manifest(without_sha256), "needs a `size` (bytes) and a `sha256` (64 hex"),
    "path outside the folder": (
        rewrite_manifest(lambda m: {**m, "files": {"../../etc/passwd": {"size": 1, "sha256": "0" * 64}}}),
        "lists '../../etc/passwd', a path outside the checkpoint folder",
    ),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_resume_skips_a_damaged_newest_checkpoint_and_says_so(tmp_path, capsys, corruption):
    damage, reason = CORRUPTIONS[corruption]
    older, newest = make_checkpoint(tmp_path, 2), make_checkpoint(tmp_path, 4)
    assert problem_with(newest) is None
    damage(newest)
    assert find_resume_checkpoint(tmp_path, IDENTITY) == older
    out = capsys.readouterr().out
    assert f"WARNING: skipping checkpoint {newest}: " in out and reason in out
    assert "resuming from the previous complete checkpoint iter_000002" in out


def test_resume_refuses_to_start_over_when_every_checkpoint_is_damaged(tmp_path):
    for iteration in (1, 2):
        flip_bytes(make_checkpoint(tmp_path, iteration))
    with pytest.raises(CheckpointError, match="none of the 2 checkpoints .* is complete.*refusing to start over"):
        find_resume_checkpoint(tmp_path, IDENTITY)


def test_a_consistent_manifest_that_lists_no_learner_state_is_not_a_resumable_checkpoint(tmp_path, capsys):
    checkpoint = make_checkpoint(tmp_path, 2)  # driver state and adapter weights, nothing else
    with pytest.raises(CheckpointError, match="none of the 1 checkpoints .* is complete"):
        find_resume_checkpoint(tmp_path, IDENTITY, files_a_resume_reads(load_config("configs/tiny.yaml")))
    assert f"skipping checkpoint {checkpoint}: manifest.json does not list learner.json, learner_state.pt" in (
        capsys.readouterr().out
    )


def test_the_files_a_resume_reads_follow_the_estimator_and_the_backend():
    gae = files_a_resume_reads(load_config("configs/tiny.yaml"))
    assert "value_head.safetensors" in gae and "learner_state.pt" in gae and "adapter/adapter_model.safetensors" in gae
    grpo = files_a_resume_reads(
        load_config("configs/tiny.yaml", ["ppo.advantage_estimator=grpo", "ppo.responses_per_prompt=2"])
    )
    assert "value_head.safetensors" not in grpo
    deepspeed = files_a_resume_reads(load_config("configs/tiny.yaml", ["ppo.learner_backend=deepspeed"]))
    assert "deepspeed/learner/mp_rank_00_model_states.pt" in deepspeed


def test_resume_with_no_checkpoint_yet_starts_from_the_beginning_and_says_so(tmp_path, capsys):
    assert find_resume_checkpoint(tmp_path / "checkpoints", IDENTITY) is None
    assert "no checkpoint under" in capsys.readouterr().out


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    make_checkpoint(tmp_path, 3)
    other = {**IDENTITY, "policy_model": "/models/b", "policy_config_sha256": "def", "lora_r": 16}
    with pytest.raises(CheckpointError, match="another model or algorithm: policy_config_sha256, lora_r differ"):
        find_resume_checkpoint(tmp_path, other)


def test_the_learner_backend_must_match_and_older_checkpoints_count_as_torch(tmp_path):
    older = {key: value for key, value in IDENTITY.items() if key != "learner_backend"}  # written before the key
    make_checkpoint(tmp_path, 1, older)
    assert find_resume_checkpoint(tmp_path, IDENTITY).name == "iter_000001"
    with pytest.raises(
        CheckpointError, match="learner_backend differ .*learner_backend torch, .*learner_backend deepspeed"
    ):
        find_resume_checkpoint(tmp_path, {**IDENTITY, "learner_backend": "deepspeed"})


def test_the_advantage_estimator_must_match_and_older_checkpoints_count_as_gae(tmp_path):
    older = {key: value for key, value in IDENTITY.items() if key != "advantage_estimator"}  # written before the key
    make_checkpoint(tmp_path, 1, older)
    assert find_resume_checkpoint(tmp_path, {**IDENTITY, "advantage_estimator": "gae"}).name == "iter_000001"
    with pytest.raises(CheckpointError, match="advantage_estimator differ .*estimator gae; .*estimator grpo"):
        find_resume_checkpoint(tmp_path, {**IDENTITY, "advantage_estimator": "grpo"})


def test_a_staging_folder_left_by_a_crash_is_never_picked(tmp_path):
    complete = make_checkpoint(tmp_path, 1)
    crashed = tmp_path / ".tmp-iter_000002"
    crashed.mkdir()
    (crashed / "driver_state.json").write_text("{}")
    assert newest_valid(tmp_path, "iter_*") == complete


def test_commit_replaces_and_prune_keeps_the_newest_complete_ones(tmp_path):
    for iteration in (1, 2, 3):
        make_checkpoint(tmp_path, iteration)
    again = make_checkpoint(tmp_path, 3)  # an existing checkpoint is replaced whole
    assert problem_with(again) is None and not list(tmp_path.glob(".old-*"))
    delete_manifest(tmp_path / "iter_000003")  # not complete: it does not count towards the kept ones
    prune(tmp_path, "iter_*", keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_000002", "iter_000003"]


def test_an_export_with_a_truncated_file_is_not_finished(tmp_path):
    from rlhf_ray.models.export import is_exported, mark_exported

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"x" * 100)
    assert not is_exported(model)  # no export.json yet
    mark_exported(model, {"stage": "sft"})
    assert is_exported(model) and json.loads((model / "export.json").read_text())["stage"] == "sft"
    (model / "model.safetensors").write_bytes(b"x" * 50)
    assert not is_exported(model)


def make_train_checkpoint(folder, name, ranks_done):
    """A Ray Train checkpoint folder of a 2-worker SFT/RM job in which `ranks_done` finished saving."""
    checkpoint = folder / name
    checkpoint.mkdir(parents=True)
    (checkpoint / "position.json").write_text('{"step": 2}')
    for rank in ranks_done:
        (checkpoint / f"rng_rank{rank}.pt").write_bytes(b"rng")
        write_manifest(checkpoint, {"step": 2, "rank": rank}, name=f"manifest_rank{rank}.json")
    return checkpoint


def test_a_train_job_resumes_from_the_newest_complete_checkpoint_registered_or_not(tmp_path, capsys):
    from rlhf_ray.train.worker import usable_checkpoint

    assert usable_checkpoint(tmp_path, False, 2, 0) is None  # nothing saved: start afresh
    make_train_checkpoint(tmp_path, "checkpoint_2026-01-01_00-00-03.000000", [0])  # stopped while saving
    assert usable_checkpoint(tmp_path, False, 2, 0) is None
    with pytest.raises(CheckpointError, match="refusing to start over"):
        usable_checkpoint(tmp_path, True, 2, 0)  # one was registered, so losing every one is an error

    complete = make_train_checkpoint(tmp_path, "checkpoint_2026-01-01_00-00-02.000000", [0, 1])
    capsys.readouterr()
    # saved by every worker though Ray Train never registered it (the run stopped right after)
    assert usable_checkpoint(tmp_path, False, 2, 0) == complete
    assert "skipping checkpoint" in (said := capsys.readouterr().out) and "1 rank manifests for 2 workers" in said
