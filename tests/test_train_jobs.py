"""SFT and RM as real Ray Train jobs on DeepSpeed (2 workers, gloo, CPU) on a tiny model."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from rlhf_ray.checkpoints import CheckpointError, sha256_of
from rlhf_ray.config import load_config
from rlhf_ray.models.export import is_exported
from rlhf_ray.train.launch import prepare_rows, registered_any, run_stage
from tests.faults import FailOnce, KillOnce, plant_pickle

pytestmark = pytest.mark.ray
ZERO2, ZERO3 = (
    "deepspeed.config_file=configs/deepspeed/zero2.json",
    "deepspeed.config_file=configs/deepspeed/zero3.json",
)


def tiny_config(tmp_path, tiny_model_dir, name, *overrides):
    return load_config(
        "configs/tiny.yaml",
        [f"model.name_or_path={tiny_model_dir}", f"run.output_dir={tmp_path}", f"run.name={name}", *overrides],
    )


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def changed_keys(before, after):
    return {k for k in after if k in before and not torch.equal(before[k], after[k])}


def assert_trained(result, base, lora, head_key=None):
    untrained, *rows = metrics(result.output_dir)
    assert untrained["step"] == 0 and "loss" not in untrained  # the eval before the first step starts the curves
    assert math.isfinite(untrained["eval_loss"])
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert is_exported(result.model_dir) and (result.output_dir / "curves.png").is_file()
    assert (result.output_dir / "config.yaml").is_file() and (result.output_dir / "deepspeed.json").is_file()
    after = weights(result.model_dir)
    changed = changed_keys(base, after)
    if lora:
        assert (result.output_dir / "adapter" / "adapter_model.safetensors").is_file()
        targets = ("q_proj", "k_proj", "v_proj", "o_proj")
        assert changed and all(any(t in k for t in targets) for k in changed), changed
        assert all(k in changed for k in after if k.endswith("v_proj.weight"))  # every layer's adapter moved
    else:
        assert not (result.output_dir / "adapter").exists()
        assert len(changed) >= len(after) // 2, f"only {len(changed)} of {len(after)} tensors changed"
    if head_key:
        assert head_key in after and head_key not in base  # the new scalar head was trained and saved


ONE_WORKER = "resources.num_workers=1 deepspeed.zero_stage=0"  # (DeepSpeed's all-reduce is skipped)


@pytest.mark.parametrize(
    "zero, lora",
    [(ZERO2, False), (ZERO3, True), (ONE_WORKER, False)],
    ids=["zero2-full", "zero3-lora", "one-worker-stage0-full"],
)
def test_sft_job(ray_local, tmp_path, tiny_model_dir, zero, lora):
    config = tiny_config(
        tmp_path, tiny_model_dir, "sft", *zero.split(), f"lora.enabled={str(lora).lower()}", "sft.lr=1e-3"
    )
    result = run_stage(config, "sft")
    assert_trained(result, weights(tiny_model_dir), lora)
    # the exported model reproduces the final eval loss measured inside training
    from transformers import AutoModelForCausalLM

    from rlhf_ray.algo.losses import next_token_loss
    from rlhf_ray.models.loading import load_tokenizer
    from rlhf_ray.train.batches import collate_sft

    tokenizer = load_tokenizer(result.model_dir)
    _, eval_rows, _ = prepare_rows(config, "sft", tokenizer)
    model = AutoModelForCausalLM.from_pretrained(str(result.model_dir))
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(eval_rows), 4):
            batch = collate_sft(eval_rows[start : start + 4], tokenizer.pad_token_id)
            s, n = next_token_loss(
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"]
            )
            total, count = total + s.item(), count + n.item()
    assert total / count == pytest.approx(metrics(result.output_dir)[-1]["eval_loss"], rel=1e-4)


@pytest.mark.parametrize("zero, lora", [(ZERO2, True), (ZERO3, False)], ids=["zero2-lora", "zero3-full"])
def test_rm_job(ray_local, tmp_path, tiny_model_dir, zero, lora):
    config = tiny_config(tmp_path, tiny_model_dir, "rm", zero, f"lora.enabled={str(lora).lower()}", "rm.lr=1e-3")
    result = run_stage(config, "rm")
    assert_trained(result, weights(tiny_model_dir), lora, head_key="score.weight")
    final = metrics(result.output_dir)[-1]
    stats = json.loads((result.model_dir / "reward_stats.json").read_text())
    assert stats["mean"] == pytest.approx(final["eval_reward_mean"], abs=1e-6) and stats["std"] > 0
    # plain transformers loads it and scores the held-out pairs as training did
    from transformers import AutoModelForSequenceClassification

    from rlhf_ray.models.loading import load_tokenizer
    from rlhf_ray.train.batches import collate_pairs

    tokenizer = load_tokenizer(result.model_dir)
    _, eval_rows, _ = prepare_rows(config, "rm", tokenizer)
    model = AutoModelForSequenceClassification.from_pretrained(str(result.model_dir))
    batch = collate_pairs(eval_rows, tokenizer.pad_token_id)
    with torch.no_grad():
        rewards = model(**batch).logits.squeeze(-1)
    chosen, rejected = rewards.chunk(2)
    assert (chosen > rejected).float().mean().item() == pytest.approx(final["eval_accuracy"], abs=1e-6)
    assert rewards.mean().item() == pytest.approx(final["eval_reward_mean"], abs=1e-5)
    # score read at the last non-pad token: the padded row scores like the same row alone
    alone = model(**collate_pairs(eval_rows[:1], tokenizer.pad_token_id)).logits.squeeze(-1)
    assert alone[0].item() == pytest.approx(chosen[0].item(), abs=1e-5)


def test_rm_job_in_bf16_mixed_precision_training_only_the_top_layer(ray_local, tmp_path, tiny_model_dir):
    config = tiny_config(
        tmp_path,
        tiny_model_dir,
        "rm-bf16",
        *ONE_WORKER.split(),
        "model.precision=bf16-mixed",
        "model.trainable_layers=1",
        "rm.lr=1e-3",
    )
    result = run_stage(config, "rm")
    untrained, *rows = metrics(result.output_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in rows)
    base, after = weights(tiny_model_dir), weights(result.model_dir)
    assert all(t.dtype == torch.float32 for t in after.values())  # fp32 master weights are what is exported
    changed = changed_keys(base, after)
    assert changed and all(k.startswith("model.layers.1.") or k == "model.norm.weight" for k in changed), changed
    assert "score.weight" in after
    # the exported model, run under the same autocast, scores the held-out pairs as training's eval did
    from transformers import AutoModelForSequenceClassification

    from rlhf_ray.models.loading import load_tokenizer
    from rlhf_ray.train.batches import collate_pairs

    tokenizer = load_tokenizer(result.model_dir)
    _, eval_rows, _ = prepare_rows(config, "rm", tokenizer)
    model = AutoModelForSequenceClassification.from_pretrained(str(result.model_dir))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        rewards = model(**collate_pairs(eval_rows, tokenizer.pad_token_id)).logits.squeeze(-1).float()
    assert rewards.mean().item() == pytest.approx(rows[-1]["eval_reward_mean"], abs=0.05)


def test_resume_and_worker_failure_give_the_same_weights(ray_local, tmp_path, tiny_model_dir, capfd):
    """4 steps straight == 4 steps with a worker SIGKILLed at step 3 (Ray Train restarts the group from the
    step-2 checkpoint) == 4 steps stopped at step 3 and rerun under the same name == the straight run
    rerun after its step-4 checkpoint was damaged (it goes back to step 2 and trains steps 3 and 4 again)."""
    common = (ZERO2, "sft.lr=1e-3", "sft.checkpoint_every=2")
    straight = run_stage(tiny_config(tmp_path, tiny_model_dir, "straight", *common), "sft")

    recovered = run_stage(
        tiny_config(tmp_path, tiny_model_dir, "recovered", *common, "sft.max_failures=1"),
        "sft",
        after_step=KillOnce(3, str(tmp_path / "recovered" / "sft" / ".injected-failure")),
    )
    assert (recovered.output_dir / ".injected-failure").is_file()

    stopped = tiny_config(tmp_path, tiny_model_dir, "stopped", *common, "sft.max_failures=0")
    with pytest.raises(Exception, match="injected failure at step 3"):
        run_stage(stopped, "sft", after_step=FailOnce(3, str(tmp_path / "stopped" / "sft" / ".injected-failure")))
    assert not is_exported(tmp_path / "stopped" / "sft" / "model")
    resumed = run_stage(stopped, "sft")

    reference = weights(straight.model_dir)
    for result in (recovered, resumed):
        assert [r["step"] for r in metrics(result.output_dir)] == [0, 1, 2, 3, 4]
        other = weights(result.model_dir)
        worst = max((reference[k] - other[k]).abs().max().item() for k in reference)
        assert worst <= 1e-6, f"{result.output_dir}: max weight difference {worst}"
    # and the metrics of the resumed steps match the straight run's
    assert [r.get("loss") for r in metrics(resumed.output_dir)][1:] == pytest.approx(
        [r.get("loss") for r in metrics(straight.output_dir)][1:], rel=1e-5
    )

    # damage the newest checkpoint of the finished straight run, then rerun it: it must skip that one
    def checkpoint_dirs():
        return sorted(p for p in (straight.output_dir / "ray" / "sft").glob("checkpoint_*") if p.is_dir())

    checkpoints = checkpoint_dirs()
    assert len(checkpoints) == 2
    assert registered_any(straight.output_dir / "ray" / "sft")  # the driver's early check reads Ray Train's snapshot
    damaged = checkpoints[-1]
    shard = max((p for p in damaged.rglob("*.pt")), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    capfd.readouterr()
    again = run_stage(tiny_config(tmp_path, tiny_model_dir, "straight", *common), "sft")
    said = capfd.readouterr()
    assert f"skipping checkpoint {damaged}" in said.out + said.err
    assert checkpoint_dirs()[-1].name > damaged.name  # steps 3 and 4 ran again
    assert [r["step"] for r in metrics(again.output_dir)] == [0, 1, 2, 3, 4]
    other = weights(again.model_dir)
    assert max((reference[k] - other[k]).abs().max().item() for k in reference) <= 1e-6

    # a pickle that runs a shell command, planted in the newest checkpoint with its manifest entry rewritten to
    # match (the checksum proves integrity, not origin): the rerun refuses it on the workers, unrun, in one line
    newest = checkpoint_dirs()[-1]
    marker = tmp_path / "the-pickle-ran"
    (model_states,) = newest.rglob("mp_rank_00_model_states.pt")
    plant_pickle(model_states, marker)
    relist_in_manifest(newest, model_states)
    logged = (again.output_dir / "metrics.jsonl").read_text()
    with pytest.raises(CheckpointError, match=f"{model_states}: refused to load: it asks for the global posix.system"):
        run_stage(tiny_config(tmp_path, tiny_model_dir, "straight", *common), "sft")
    assert not marker.exists()
    assert (again.output_dir / "metrics.jsonl").read_text() == logged  # the run's outputs are left as they were


def relist_in_manifest(folder, path):
    """Rewrite the size and checksum of `path` in whichever rank manifest of `folder` lists it."""
    key = path.relative_to(folder).as_posix()
    for manifest in folder.glob("manifest_rank*.json"):
        listed = json.loads(manifest.read_text())
        if key in listed["files"]:
            listed["files"][key] = {"size": path.stat().st_size, "sha256": sha256_of(path)}
            manifest.write_text(json.dumps(listed))
            return
    raise AssertionError(f"no manifest in {folder} lists {key}")


def test_nan_losses_stop_the_job_after_k_steps_in_a_row_and_nothing_is_exported(
    ray_local, tmp_path, tiny_model_dir, capfd
):
    """A model with an inf in its final norm: every loss is NaN, on both workers. Each such micro-batch adds no
    gradient and its step is counted; the third in a row stops the job, with one line and exit 1, unexported."""
    import shutil

    from safetensors.torch import save_file

    from rlhf_ray.cli import main

    poisoned = tmp_path / "poisoned-model"
    shutil.copytree(tiny_model_dir, poisoned)
    state = weights(poisoned)
    state["model.norm.weight"][0] = float("inf")
    save_file(state, str(poisoned / "model.safetensors"), metadata={"format": "pt"})
    code = main(
        ["sft", "configs/tiny.yaml", f"model.name_or_path={poisoned}", f"run.output_dir={tmp_path}", "run.name=nan"]
    )
    err = capfd.readouterr().err
    assert code == 1
    assert (
        "rlhf-ray: run stopped: sft: the loss or the gradients were not finite (NaN/inf) in 3 optimizer steps in a "
        "row, up to step 3 "
        "(sft.max_nonfinite_in_a_row=3); nothing was exported" in err
    )
    out = tmp_path / "nan" / "sft"
    assert not (out / "model").exists() and not is_exported(out / "model")


def test_weights_with_nan_or_inf_are_named():
    from rlhf_ray.train.export import nonfinite_tensors

    state = {
        "a": torch.ones(2),
        "b": torch.tensor([1.0, float("nan")]),
        "c": torch.tensor([1, 2]),
        "d": torch.full((1,), -math.inf),
    }
    assert nonfinite_tensors(state) == ["b", "d"]


def test_a_second_local_run_on_the_same_machine_stays_apart(ray_local, tmp_path, tiny_model_dir):
    """A CLI run started while another local Ray runs (this suite's) starts its own cluster: it says so,
    finishes, and neither its helpers nor ours reach into the other cluster ("Found multiple active Ray
    instances" from Ray Train's placement-group cleaner was the symptom)."""
    import os
    import subprocess
    import sys

    from ray._private.state import actors  # the GCS actor table (the suite's Ray runs without a dashboard)

    before = set(actors())
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    command = [
        sys.executable,
        "-m",
        "rlhf_ray.cli",
        "rm",
        "configs/tiny.yaml",
        f"model.name_or_path={tiny_model_dir}",
        f"run.output_dir={tmp_path}",
        "run.name=second",
        "resources.num_workers=1",
        "deepspeed.zero_stage=0",
    ]
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-4000:]
    assert "started a local Ray" in log and "other Ray instance(s) run on this machine" in log, log[-4000:]
    assert "multiple active Ray instances" not in log, log[-4000:]
    assert is_exported(tmp_path / "second" / "rm" / "model")
    arrived = {actor["ActorClassName"] for actor_id, actor in actors().items() if actor_id not in before}
    assert not arrived & {"TrainController", "PlacementGroupCleaner", "RayTrainWorker"}, arrived
