"""GRPO and RLOO learn with a rule reward: SmolLM2-135M-Instruct answering small sums, no reward model, no critic.

One run takes its reward from a Python function in a Ray actor, the other from an HTTP reward server this
test starts on 127.0.0.1.
"""

import json

import pytest

from rlhf_ray.config import load_config
from rlhf_ray.rewards.examples import exact_answer
from tests.reward_server import RewardServer

pytestmark = pytest.mark.e2e

ITERATIONS = 8
MARGIN = 0.15  # rise of the share of right answers, last 3 iterations vs first 3
KL_BOUND = 5.0  # nats per sequence


def right_answers(payload: dict) -> dict:
    """The HTTP server's reward: the same rule as the function, computed in this process."""
    rows = zip(payload["prompts"], payload["responses"], payload["fields"])
    return {"rewards": [exact_answer(prompt, response, fields) for prompt, response, fields in rows]}


@pytest.fixture()
def reward_server():
    server = RewardServer(right_answers)
    yield server
    server.close()


@pytest.mark.parametrize("estimator, source", [("grpo", "function"), ("rloo", "http")])
def test_critic_free_estimators_learn_exact_answers(ray_local, tmp_path, smollm2_dir, reward_server, estimator, source):
    from rlhf_ray.ppo.run import run_ppo

    rewards = (
        '[{kind: function, function: "rlhf_ray.rewards.examples:exact_answer"}]'
        if source == "function"
        else f'[{{kind: http, url: "{reward_server.url}", timeout_s: 60}}]'
    )
    config = load_config(
        "configs/grpo-arithmetic.yaml",
        [
            f"run.output_dir={tmp_path}",
            f"run.name=learn-{estimator}",
            f"ppo.policy_model={smollm2_dir}",
            f"ppo.advantage_estimator={estimator}",
            f"ppo.rewards={rewards}",
            f"ppo.iterations={ITERATIONS}",
            "ppo.checkpoint_every=0",
            "ppo.sample_every=0",
        ],
    )
    result = run_ppo(config)
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    right = [r["reward_mean"] for r in rows]
    before, after = sum(right[:3]) / 3, sum(right[-3:]) / 3
    max_kl = max(r["kl"] for r in rows)
    print(
        f"\n{estimator} learning check (SmolLM2-135M-Instruct, {source} reward, {ITERATIONS} iterations): "
        f"right answers {before:.2f} -> {after:.2f} (needed +{MARGIN}); max KL {max_kl:.3f} (bound {KL_BOUND}); "
        f"zero-advantage groups {[r['zero_advantage_groups'] for r in rows]}; "
        f"seconds per iteration {sum(r['seconds_iteration'] for r in rows) / len(rows):.1f}"
    )
    assert after - before >= MARGIN, right
    assert max_kl < KL_BOUND
    assert not any("value_loss" in r for r in rows)
    if source == "http":
        assert len(reward_server.requests) == ITERATIONS  # one request per iteration, the whole batch
