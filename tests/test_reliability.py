"""Fault injection on real Ray actors and a real vLLM engine (tiny model): actors killed mid-run,
NaN/inf rewards, calls that hang, and roles that keep dying."""

import json
import os
import random
import re
import signal
import sys
import threading
import time

import pytest
import ray
import torch

from actors.reward_model import RewardModel
from rlhf_ray.config import load_config

pytestmark = pytest.mark.ray
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import test modules

NAMESPACE_PREFIX = "rlhf-ray-"


def ppo_config(tmp_path, tiny_model_dir, tiny_reward_dir, name, *overrides):
    return load_config(
        "configs/tiny.yaml",
        [
            f"run.output_dir={tmp_path}",
            f"run.name={name}",
            f"model.name_or_path={tiny_model_dir}",
            f"ppo.policy_model={tiny_model_dir}",
            f"ppo.reward_model={tiny_reward_dir}",
            "lora.r=8",
            "lora.alpha=16",
            "ppo.sample_every=0",
            *overrides,
        ],
    )


def rows(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def adapter_tensors(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))


def kill_actor(name: str, namespace: str, how: str) -> None:
    for _ in range(200):  # the actor may be between death and re-creation
        try:
            handle = ray.get_actor(name, namespace=namespace)
            break
        except ValueError:
            time.sleep(0.1)
    else:
        raise AssertionError(f"no live actor {name} to kill")
    if how == "ray.kill":
        ray.kill(handle, no_restart=True)
    else:  # the actor's worker process, as the OOM killer or a crash would end it
        from ray._private import state

        os.kill(state.actors(handle._actor_id.hex())["Pid"], signal.SIGKILL)


class Killer(threading.Thread):
    """After iteration j of `plan` is logged (the first time), wait a random part of an iteration, then kill."""

    def __init__(self, metrics_path, namespace, plan, seed):
        super().__init__(daemon=True)
        self.metrics_path, self.namespace, self.plan = metrics_path, namespace, list(plan)
        self.random = random.Random(seed)
        self.done: list[str] = []
        self.stop = threading.Event()
        self.finished = threading.Event()

    def hold(self, iteration, metrics, saved):
        """`on_iteration` hook, a safety net for fast machines: the run may not end before every kill is done."""
        if iteration >= self.plan[-1][0] + 2:
            self.finished.wait(timeout=120)

    def run(self):
        try:
            self._kill_as_planned()
        finally:
            self.finished.set()

    def _kill_as_planned(self):
        for after_iteration, role, how in self.plan:
            while not self.stop.is_set():
                try:
                    logged = rows(self.metrics_path.parent) if self.metrics_path.exists() else []
                except ValueError:  # a line being written
                    logged = []
                if len(logged) >= after_iteration:
                    break
                time.sleep(0.05)
            if self.stop.is_set():
                return
            time.sleep(self.random.uniform(0.0, logged[-1]["seconds_iteration"]))  # somewhere in the next iteration
            kill_actor(role, self.namespace, how)
            self.done.append(f"{role} by {how} after iteration {after_iteration}")


@pytest.fixture(scope="module")
def uninterrupted(ray_local, tmp_path_factory, tiny_model_dir, tiny_reward_dir):
    from rlhf_ray.ppo.run import run_ppo

    tmp = tmp_path_factory.mktemp("straight")
    return run_ppo(ppo_config(tmp, tiny_model_dir, tiny_reward_dir, "straight", *ITERATIONS))


ITERATIONS = ["ppo.iterations=12", "ppo.checkpoint_every=3"]
KILL_PLANS = {  # (after iteration, role, how): each role once, each way once over the two plans
    "os-kill-generator-and-reference": [
        (2, "rollout-generator-0", "os.kill"),
        (4, "reward-model", "ray.kill"),
        (6, "reference-model", "os.kill"),
        (8, "policy-learner", "ray.kill"),
    ],
    "os-kill-reward-and-learner": [
        (2, "rollout-generator-0", "ray.kill"),
        (4, "reward-model", "os.kill"),
        (6, "reference-model", "ray.kill"),
        (8, "policy-learner", "os.kill"),
    ],
}


@pytest.mark.parametrize("plan", list(KILL_PLANS), ids=list(KILL_PLANS))
def test_each_role_killed_mid_run_and_the_run_matches_an_uninterrupted_one(
    plan, uninterrupted, tmp_path, tiny_model_dir, tiny_reward_dir, capfd
):
    from rlhf_ray.ppo.run import run_ppo

    name = f"killed-{plan}"
    config = ppo_config(tmp_path, tiny_model_dir, tiny_reward_dir, name, *ITERATIONS)
    killer = Killer(
        tmp_path / name / "ppo" / "metrics.jsonl", NAMESPACE_PREFIX + name, KILL_PLANS[plan], seed=len(plan)
    )
    killer.start()
    try:
        result = run_ppo(config, on_iteration=killer.hold)
    finally:
        killer.stop.set()
        killer.join(timeout=5)
    output = capfd.readouterr()
    print(output.out[-4000:], output.err[-4000:])
    assert len(killer.done) == 4, killer.done
    for role in ("rollout-generator-0", "reward-model", "reference-model", "policy-learner"):
        assert f"[ppo] {role} (pid" in output.out + output.err and "re-creating it (1/3)" in output.out + output.err

    # the learner's weights came back from a checkpoint, not from a replay of the whole run
    replays = re.findall(r"replaying from (\S+)", output.out + output.err)
    assert replays and all("/ppo/checkpoints/iter_" in where for where in replays), replays

    mine, reference = rows(result.output_dir), rows(uninterrupted.output_dir)
    assert [r["step"] for r in mine] == list(range(1, 13))  # none lost, none repeated (a replay trims the log)
    assert mine[-1]["actor_restarts"] == 4
    assert mine[-1]["samples_seen"] == reference[-1]["samples_seen"]
    assert mine[-1]["policy_version"] == reference[-1]["policy_version"] == 12
    assert mine[-1]["generator_versions_min"] == mine[-1]["generator_versions_max"] == 12
    for key in ("reward_mean", "kl", "response_length"):
        assert [r[key] for r in mine] == pytest.approx([r[key] for r in reference], rel=1e-4, abs=1e-6), key
    # seeded vLLM sampling is repeatable on CPU, so the final adapter matches to float rounding
    a, b = adapter_tensors(result.output_dir), adapter_tensors(uninterrupted.output_dir)
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"largest adapter weight difference vs the uninterrupted run: {worst:.3g}")
    assert worst <= 1e-4


class InfRewardModel(RewardModel):
    """The real reward model, except the scores of the score() calls listed in `poisoned_calls` hold an inf."""

    def __init__(self, *args, poisoned_calls=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.calls, self.poisoned = 0, set(poisoned_calls)

    def score(self, prompts, responses, rows=None):
        scores = super().score(prompts, responses, rows)
        self.calls += 1
        if self.calls in self.poisoned:
            scores[0] = float("inf")
        return scores


def test_nonfinite_rewards_skip_the_update_and_k_in_a_row_stop_the_run(
    ray_local, tmp_path, tiny_model_dir, tiny_reward_dir
):
    from rlhf_ray.models.loading import load_tokenizer
    from rlhf_ray.ppo.launch import actor_specs, launch_actors
    from rlhf_ray.ppo.prompts import load_prompt_set
    from rlhf_ray.ppo.run import NonFiniteError, PPOLoop, model_identity, resolve_model_paths
    from rlhf_ray.roles import LEARNER, REWARD

    config = ppo_config(
        tmp_path,
        tiny_model_dir,
        tiny_reward_dir,
        "nan",
        "ppo.iterations=6",
        "ppo.checkpoint_every=0",
        "ppo.max_nonfinite_in_a_row=2",
    )
    paths = resolve_model_paths(config)
    tokenizer = load_tokenizer(paths.policy)
    specs = actor_specs(config, paths, tokenizer, config.data.max_prompt_length + config.ppo.max_new_tokens)
    reward = next(spec for spec in specs if spec.name == REWARD)
    reward.cls, reward.kwargs = InfRewardModel, {**reward.kwargs, "poisoned_calls": (2, 4, 5)}
    crew = launch_actors(config, specs)
    adapters = {}

    def snapshot(iteration, metrics, saved):
        adapters[iteration] = crew.call("test", LEARNER, "export_adapter").files["adapter_model.safetensors"]

    out = (tmp_path / "nan" / "ppo").resolve()
    loop = PPOLoop(
        config, crew, load_prompt_set(config, tokenizer), tokenizer, out, model_identity(config, paths), snapshot
    )
    try:
        with pytest.raises(NonFiniteError) as stopped:
            loop.run(None)
    finally:
        crew.stop()
    logged = rows(out)
    assert [r["step"] for r in logged] == [1, 2, 3, 4]  # iteration 5 is the second skip in a row: it stops there
    assert [r["policy_version"] for r in logged if "policy_version" in r] == [1, 2]
    assert [r["skipped_updates"] for r in logged] == [0, 1, 1, 2]
    assert adapters[2] == adapters[1]  # the poisoned update left the weights alone
    assert adapters[3] != adapters[2]  # and the next one trained
    assert all("reward_mean" not in r for r in (logged[1], logged[3]))  # an inf mean is not logged as a number
    message = str(stopped.value)
    assert "stopping at iteration 5: 2 updates in a row were skipped" in message and "scores" in message
    assert (
        f"prompt ids of that batch: {loop.prompts.batch(4, config.ppo.rollout_batch_size, config.run.seed)}" in message
    )


class Sleeper:
    def nap(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    def die(self) -> None:
        os._exit(1)


def test_a_hung_call_times_out_naming_the_actor_and_phase(ray_local):
    from rlhf_ray.ppo.crew import ActorCallTimeout, ActorCrew, Call, RoleSpec

    crew = ActorCrew(
        [RoleSpec("sleeper", Sleeper, options={"name": "sleeper", "namespace": "t-hang", "num_cpus": 0})],
        max_restarts=1,
        timeout_s=60.0,
    )  # (an actor's start can take seconds while others shut down)
    crew.timeout_s = 2.0
    try:
        assert crew.run("warmup", [Call("sleeper", "nap", (0.1,))]) == [0.1]
        start = time.monotonic()
        with pytest.raises(ActorCallTimeout, match="sleeper did not finish generate within 2 s"):
            crew.run("generate", [Call("sleeper", "nap", (60,))])
        assert time.monotonic() - start < 10
    finally:
        crew.stop()


def test_a_role_that_keeps_dying_gives_up_with_a_clear_error(ray_local):
    from rlhf_ray.ppo.crew import ActorCrew, Call, RoleKeepsDying, RoleSpec

    crew = ActorCrew(
        [RoleSpec("doomed", Sleeper, options={"name": "doomed", "namespace": "t-die", "num_cpus": 0})],
        max_restarts=2,
        timeout_s=60.0,
    )
    try:
        with pytest.raises(
            RoleKeepsDying,
            match=r"doomed died 3 times \(resources.max_actor_restarts=2\); "
            r"last time during score",
        ):
            crew.run("score", [Call("doomed", "die")])
        assert crew.restarts["doomed"] == 3
    finally:
        crew.stop()


def test_nonfinite_names_checks_only_real_tokens():
    from rlhf_ray.algo.ppo import nonfinite_names

    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    padded_nan = torch.tensor([[0.1, 0.2, float("nan")], [0.3, float("inf"), 0.0]])  # only padding is bad
    real_inf = torch.tensor([[0.1, float("-inf"), 0.0], [0.3, 0.0, 0.0]])
    scores = torch.tensor([1.0, float("nan")])
    assert nonfinite_names({"a": padded_nan, "b": real_inf, "scores": scores}, mask) == ["b", "scores"]
