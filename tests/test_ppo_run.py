"""PPO end to end over real Ray actors and a real vLLM engine, on the tiny model."""

import json
import math

import pytest

from rlhf_ray.config import load_config

pytestmark = pytest.mark.ray


def ppo_config(tmp_path, tiny_model_dir, tiny_reward_dir, name, *overrides):
    return load_config(
        "configs/tiny.yaml",
        [
            f"run.output_dir={tmp_path}",
            f"run.name={name}",
            f"model.name_or_path={tiny_model_dir}",
            f"ppo.policy_model={tiny_model_dir}",
            f"ppo.reward_model={tiny_reward_dir}",
            "data.prompts.path=data/demo/prompts.jsonl",
            "lora.r=8",
            "lora.alpha=16",
            *overrides,
        ],
    )


@pytest.mark.parametrize("backend, weight_sync", [("torch", "merged"), ("deepspeed", "adapter")])
def test_three_iterations_end_to_end(ray_local, tmp_path, tiny_model_dir, tiny_reward_dir, backend, weight_sync):
    """The learner actor on either optimizer backend (deepspeed: a real ZeRO-2 engine inside the Ray actor),
    and the generators on either way of getting its weights."""
    from rlhf_ray.ppo.run import run_ppo

    config = ppo_config(
        tmp_path,
        tiny_model_dir,
        tiny_reward_dir,
        "ppo3",
        "ppo.iterations=3",
        "ppo.checkpoint_every=2",
        "ppo.sample_every=1",
        "ppo.responses_per_prompt=2",
        f"ppo.learner_backend={backend}",
        f"ppo.weight_sync={weight_sync}",
        "ppo.lr=1e-2",
    )
    result = run_ppo(config)
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert all(math.isfinite(v) for v in row.values() if isinstance(v, (int, float))), row
        # every generator runs the policy version the learner just produced
        assert row["generator_versions_min"] == row["generator_versions_max"] == row["policy_version"] == row["step"]
        # ... and really samples from the learner's policy (vLLM's log-probs agree with the learner's)
        assert row["generator_logprob_gap"] < 1e-3, row
    assert rows[-1]["samples_seen"] == 3 * 4 * 2
    for key in (
        "reward_mean",
        "kl",
        "entropy",
        "clip_fraction",
        "approx_kl",
        "value_loss",
        "explained_variance",
        "response_length",
        "generated_tokens_per_s",
        "seconds_generate",
        "seconds_update",
    ):
        assert key in rows[-1]
    checkpoints = result.output_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["iter_000002", "iter_000003"]
    assert (checkpoints / "iter_000003" / "deepspeed").is_dir() == (backend == "deepspeed")
    assert (result.output_dir / "samples.jsonl").read_text().count("\n") >= 3
    assert (result.output_dir / "curves.png").is_file()

    # the final outputs load in transformers and peft
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(result.output_dir / "model"))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    assert PeftModel.from_pretrained(base, str(result.output_dir / "adapter")) is not None
    assert merged.config.vocab_size == base.config.vocab_size


def test_grpo_with_a_reward_function_beside_the_reward_model_runs_without_a_critic(
    ray_local, tmp_path, tiny_model_dir, tiny_reward_dir
):
    """Critic-free GRPO: no value head anywhere, the reward is the weighted sum of the RM and a function
    (each source's mean logged beside it), and the checkpoint records the estimator."""
    from rlhf_ray.checkpoints import read_manifest
    from rlhf_ray.ppo.run import run_ppo

    rewards = '[{kind: model, weight: 0.5}, {kind: function, function: "rlhf_ray.rewards.examples:brevity"}]'
    config = ppo_config(
        tmp_path,
        tiny_model_dir,
        tiny_reward_dir,
        "grpo",
        "ppo.iterations=2",
        "ppo.rollout_batch_size=2",
        "ppo.responses_per_prompt=4",
        "ppo.minibatch_size=4",
        "ppo.checkpoint_every=1",
        "ppo.sample_every=0",
        "ppo.advantage_estimator=grpo",
        "ppo.kl_in=loss",
        "ppo.kl_estimator=k3",
        "ppo.loss_aggregation=seq-mean-token-mean",
        "ppo.clip_range_high=0.28",
        f"ppo.rewards={rewards}",
        "ppo.lr=1e-2",
    )
    result = run_ppo(config)
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["policy_version"] for r in rows] == [1, 2]
    for row in rows:
        assert row["reward_mean"] == pytest.approx(0.5 * row["reward_mean_model"] + row["reward_mean_function_1"])
        assert 0 < row["reward_mean_function_1"] <= 1  # brevity is in (0, 1]
        assert 0 <= row["zero_advantage_groups"] <= 2 and "kl_loss" in row
        assert not {"value_loss", "explained_variance", "return_mean", "value_clip_fraction"} & set(row), row
    checkpoint = result.output_dir / "checkpoints" / "iter_000002"
    assert read_manifest(checkpoint)["advantage_estimator"] == "grpo"
    assert not (checkpoint / "value_head.safetensors").exists()
    assert json.loads((result.output_dir / "model" / "export.json").read_text())["advantage_estimator"] == "grpo"


def test_a_reward_function_that_fails_stops_the_run_naming_the_function_and_the_row(
    ray_local, tmp_path, tiny_model_dir, capfd
):
    """No reward model at all: the only source is a function from a file, which raises on the second prompt."""
    from rlhf_ray.cli import main

    source = tmp_path / "picky_reward.py"
    source.write_text(
        "def picky(prompt, response, fields):\n"
        "    if fields.get('id') == 2:\n"
        "        raise ValueError('cannot judge this one')\n"
        "    return 1.0\n"
    )
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {i}.", "id": i}) + "\n" for i in range(4)))
    code = main(
        [
            "ppo",
            "configs/tiny.yaml",
            f"run.output_dir={tmp_path}",
            "run.name=picky",
            f"ppo.policy_model={tiny_model_dir}",
            f"data.prompts.path={prompts}",
            "data.eval_fraction=0",
            "data.test_fraction=0",
            "ppo.rollout_batch_size=4",
            "ppo.minibatch_size=4",
            f"ppo.rewards=[{{kind: function, function: '{source}:picky'}}]",
        ]
    )
    err = capfd.readouterr().err
    assert code == 1
    assert f"rlhf-ray: run stopped: reward function {source}:picky raised ValueError: cannot judge this one" in err
    assert f"{prompts}:3)" in err  # the row with id 2 is line 3 of the file
    assert "Traceback" not in err


def test_dynamic_sampling_trains_only_on_prompts_whose_responses_scored_differently(
    ray_local, tmp_path, tiny_model_dir
):
    """A reward that is the same for every response to an even-numbered prompt: dynamic sampling sets those
    aside and samples more rounds, so the prompts trained on are odd-numbered."""
    from rlhf_ray.ppo.run import run_ppo

    source = tmp_path / "parity_reward.py"
    source.write_text(
        "def parity(prompt, response, fields):\n    return 1.0 if fields['id'] % 2 == 0 else float(len(response))\n"
    )
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {i}.", "id": i}) + "\n" for i in range(16)))
    config = load_config(
        "configs/tiny.yaml",
        [
            f"run.output_dir={tmp_path}",
            "run.name=dynamic",
            f"ppo.policy_model={tiny_model_dir}",
            f"data.prompts.path={prompts}",
            "data.eval_fraction=0",
            "data.test_fraction=0",
            "ppo.iterations=2",
            "ppo.rollout_batch_size=4",
            "ppo.responses_per_prompt=2",
            "ppo.minibatch_size=8",
            "ppo.advantage_estimator=rloo",
            "ppo.dynamic_sampling=true",
            "ppo.max_sampling_rounds=4",
            "ppo.checkpoint_every=1",
            f"ppo.rewards=[{{kind: function, function: '{source}:parity'}}]",
        ],
    )
    result = run_ppo(config)
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert row["sampling_rounds"] >= 2 and row["discarded_groups"] >= 2, row  # a batch of 4 has 2 even ids
        assert row["zero_advantage_groups"] == row["filled_zero_advantage_groups"] == 0, row
        assert "seconds_score" in row and row["samples_seen"] % 8 == 0
    for iteration in (1, 2):
        state = json.loads(
            (result.output_dir / "checkpoints" / f"iter_{iteration:06d}" / "driver_state.json").read_text()
        )
        ids = [json.loads(line)["id"] for line in prompts.read_text().splitlines()]
        assert len(state["prompt_ids"]) == 4 and all(ids[i] % 2 == 1 for i in state["prompt_ids"]), state


def test_overlapped_generation_samples_the_next_batch_with_the_weights_before_the_update(
    ray_local, tmp_path, tiny_model_dir, tiny_reward_dir
):
    """Iteration 1 is sampled on its own by the starting policy; batches 2 and 3 are sampled during the
    update before them, so vLLM's log-probs trail the learner's by exactly that update."""
    from rlhf_ray.ppo.run import run_ppo

    config = ppo_config(
        tmp_path,
        tiny_model_dir,
        tiny_reward_dir,
        "overlap",
        "ppo.iterations=3",
        "ppo.checkpoint_every=0",
        "ppo.sample_every=0",
        "ppo.lr=1e-2",
        "ppo.overlap_generation=true",
    )
    result = run_ppo(config)
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["policy_version"] for r in rows] == [1, 2, 3]
    assert [r["generator_versions_max"] for r in rows] == [1, 2, 3]
    assert rows[0]["generator_logprob_gap"] < 1e-3
    assert all(r["generator_logprob_gap"] > 1e-2 for r in rows[1:]), [r["generator_logprob_gap"] for r in rows]
    assert ["seconds_generate" in r for r in rows] == [True, False, False]
    assert ["seconds_update_and_generate_next" in r for r in rows] == [True, True, False]
    assert rows[-1]["samples_seen"] == 3 * 4


def test_driver_killed_then_resumed_matches_an_uninterrupted_run(
    ray_local, tmp_path, tiny_model_dir, tiny_reward_dir, capfd
):
    """SIGKILL the `rlhf-ray ppo` process once iteration 2's checkpoint is complete, rerun it with --resume:
    every iteration is logged once, and the seeded run gives the same metrics as one never interrupted.
    Then damage the newest checkpoint and resume for one more iteration: it goes back to the previous one."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import ray

    from rlhf_ray.ppo.run import run_ppo

    overrides = [
        f"run.output_dir={tmp_path}",
        f"model.name_or_path={tiny_model_dir}",
        f"ppo.policy_model={tiny_model_dir}",
        f"ppo.reward_model={tiny_reward_dir}",
        "lora.r=8",
        "lora.alpha=16",
        "ppo.iterations=4",
        "ppo.checkpoint_every=1",
        "ppo.sample_every=0",
    ]
    straight = run_ppo(load_config("configs/tiny.yaml", [*overrides, "run.name=straight"]))

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    command = [sys.executable, "-m", "rlhf_ray.cli", "ppo", "configs/tiny.yaml", *overrides, "run.name=killed"]
    out = tmp_path / "killed" / "ppo"
    driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not (out / "checkpoints" / "iter_000002" / "manifest.json").exists():
        assert driver.poll() is None, "the driver ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.2)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    assert not (out / "model").exists()

    resumed = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr

    def rows(folder):
        return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]

    mine, reference = rows(out), rows(straight.output_dir)
    assert [r["step"] for r in mine] == [1, 2, 3, 4]
    assert [r["samples_seen"] for r in mine] == [r["samples_seen"] for r in reference]
    assert [r["policy_version"] for r in mine] == [1, 2, 3, 4]
    for key in ("reward_mean", "kl", "response_length", "policy_loss", "value_loss"):  # seeded sampling: same run
        assert [r[key] for r in mine] == pytest.approx([r[key] for r in reference], rel=1e-4, abs=1e-6), key

    # a flipped byte in the newest checkpoint: resume skips it, says so, and replays from the one before
    adapter = out / "checkpoints" / "iter_000004" / "adapter" / "adapter_model.safetensors"
    data = bytearray(adapter.read_bytes())
    data[len(data) // 2] ^= 0xFF
    adapter.write_bytes(bytes(data))
    capfd.readouterr()
    run_ppo(load_config("configs/tiny.yaml", [*overrides, "run.name=killed", "ppo.iterations=5"]), resume=True)
    said = capfd.readouterr().out
    assert (
        "WARNING: skipping checkpoint" in said
        and "iter_000004: adapter/adapter_model.safetensors does not match" in said
    )
    assert "resuming from the previous complete checkpoint iter_000003" in said
    assert [r["step"] for r in rows(out)] == [1, 2, 3, 4, 5]

    # a checkpoint written for another model shape is refused before anything starts
    from rlhf_ray.cli import main

    assert (
        main(["ppo", "configs/tiny.yaml", *overrides, "run.name=killed", "lora.r=4", "ppo.iterations=6", "--resume"])
        == 2
    )
    assert "was written for another model or algorithm: lora_r differ" in capfd.readouterr().err
