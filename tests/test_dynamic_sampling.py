"""Dynamic sampling's choice of groups, on made-up rollouts and scores (no Ray)."""

import pytest
import torch

from rlhf_ray.ppo.dynamic_sampling import informative_groups
from rlhf_ray.ppo.rollouts import PromptBatch
from rlhf_ray.wire import PromptRow, Rollout, SamplingSpec

pytestmark = pytest.mark.unit
K = 2


def sampled(first_prompt: int, rewards: list[float]):
    """A batch of len(rewards) / K prompts numbered from `first_prompt`; response j's single token is its reward."""
    n = len(rewards) // K
    ids = list(range(first_prompt, first_prompt + n))
    rows = [PromptRow(f"prompt {i}", {}, f"p.jsonl:{i + 1}") for i in ids]
    batch = PromptBatch(0, ids, [[100 + i] for i in ids], SamplingSpec(4, n=K), rows)
    rollouts = [Rollout(j // K, [int(r)], [0.0], True) for j, r in enumerate(rewards)]
    return batch, rollouts


def score(batch, rollouts):
    """Two sources: the token itself, and a constant (which makes no group informative by itself)."""
    tokens = torch.tensor([float(r.token_ids[0]) for r in rollouts])
    return {"reward-model": tokens, "reward-function-1": torch.ones(len(rollouts))}


WEIGHTS = {"reward-model": 1.0, "reward-function-1": 0.5}


def test_groups_with_equal_rewards_are_replaced_by_informative_ones_from_later_rounds():
    first = sampled(0, [1, 1, 0, 1, 2, 2])  # prompt 0 and 2 uninformative, prompt 1 informative
    rounds = {1: sampled(10, [3, 4, 5, 5, 0, 0]), 2: sampled(20, [6, 7, 8, 9, 1, 2])}
    asked = []

    def sample_round(r):
        asked.append(r)
        return rounds[r]

    result = informative_groups(first, sample_round, score, WEIGHTS, max_rounds=5)
    assert asked == [1, 2]  # round 1 found one more informative prompt, round 2 the third
    assert result.batch.prompt_ids == [1, 10, 20]
    assert result.batch.prompts == [[101], [110], [120]]
    assert [row.ref for row in result.batch.rows] == ["p.jsonl:2", "p.jsonl:11", "p.jsonl:21"]
    assert [r.prompt_index for r in result.rollouts] == [0, 0, 1, 1, 2, 2]  # grouped, pointing at the new batch
    assert [r.token_ids[0] for r in result.rollouts] == [0, 1, 3, 4, 6, 7]
    assert result.scores["reward-model"].tolist() == [0, 1, 3, 4, 6, 7]
    assert result.scores["reward-function-1"].tolist() == [1.0] * 6
    assert result.metrics == {
        "sampling_rounds": 3,
        "discarded_groups": 6,
        "filled_zero_advantage_groups": 0,
        "sampled_tokens": 18,  # every response sampled in the three rounds (one token each), used or not
    }


def test_after_the_last_round_the_batch_is_filled_with_set_aside_groups_in_sampling_order():
    first = sampled(0, [1, 1, 0, 1, 2, 2])
    result = informative_groups(first, lambda r: sampled(10, [5, 5, 5, 5, 5, 5]), score, WEIGHTS, max_rounds=2)
    assert result.batch.prompt_ids == [1, 0, 2]  # the informative one, then the set-aside ones in order
    assert result.metrics == {
        "sampling_rounds": 2,
        "discarded_groups": 3,
        "filled_zero_advantage_groups": 2,
        "sampled_tokens": 12,
    }


def test_one_round_with_enough_informative_groups_samples_nothing_more():
    first = sampled(0, [0, 1, 1, 0])

    def no_more(r):
        raise AssertionError("sampled again")

    result = informative_groups(first, no_more, score, WEIGHTS, max_rounds=3)
    assert result.batch.prompt_ids == [0, 1] and result.metrics["sampling_rounds"] == 1
