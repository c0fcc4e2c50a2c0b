"""Critic-free advantage estimators against numbers worked out by hand."""

import math
import statistics

import pytest
import torch

from rlhf_ray.algo.advantages import (
    critic_free_advantages,
    dr_grpo_advantages,
    grpo_advantages,
    per_token,
    reinforce_pp_advantages,
    rloo_advantages,
    zero_advantage_groups,
)

pytestmark = pytest.mark.unit

# two prompts, four responses each: [1, 2, 3, 6] (mean 3, deviations -2, -1, 0, 3) and four equal rewards
REWARDS = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])


def test_grpo_divides_the_deviation_from_the_group_mean_by_the_bessel_corrected_group_std():
    std = math.sqrt((4 + 1 + 0 + 9) / 3)  # sum of squared deviations over k - 1 = 3
    expected = [-2 / std, -1 / std, 0.0, 3 / std, 0.0, 0.0, 0.0, 0.0]  # equal rewards: 0 / (0 + eps)
    assert grpo_advantages(REWARDS, 4).tolist() == pytest.approx(expected, rel=1e-5)


def test_dr_grpo_keeps_the_deviation_from_the_group_mean():
    assert dr_grpo_advantages(REWARDS, 4).tolist() == [-2.0, -1.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0]


def test_rloo_subtracts_the_mean_of_the_other_responses():
    # 1 - (2 + 3 + 6) / 3, 2 - (1 + 3 + 6) / 3, 3 - (1 + 2 + 6) / 3, 6 - (1 + 2 + 3) / 3
    expected = [1 - 11 / 3, 2 - 10 / 3, 0.0, 4.0, 0.0, 0.0, 0.0, 0.0]
    assert rloo_advantages(REWARDS, 4).tolist() == pytest.approx(expected, abs=1e-6)
    # the same as k / (k - 1) times the deviation from the group mean
    assert rloo_advantages(REWARDS, 4).tolist() == pytest.approx(
        (dr_grpo_advantages(REWARDS, 4) * 4 / 3).tolist(), abs=1e-6
    )


def test_reinforce_pp_whitens_the_returns_to_go_over_the_batch():
    token_rewards = torch.tensor([[0.1, -0.2, 1.0], [0.5, 2.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # the 9.0 is padding and must not count
    # returns to go with gamma 1: row 0 [0.9, 0.8, 1.0], row 1 [2.5, 2.0, -]
    returns = [0.9, 0.8, 1.0, 2.5, 2.0]
    mean, std = statistics.fmean(returns), statistics.pstdev(returns)  # 1.44, sqrt(2.332 / 5)
    whitened = [(r - mean) / std for r in returns]
    got = reinforce_pp_advantages(token_rewards, mask)
    assert got[mask.bool()].tolist() == pytest.approx(whitened, abs=1e-5)
    assert got[1, 2] == 0.0
    # gamma 0.5: row 0 [0.1 + 0.5 * 0.3, -0.2 + 0.5 * 1.0, 1.0] = [0.25, 0.3, 1.0], row 1 [0.5 + 0.5 * 2.0, 2.0]
    discounted = [0.25, 0.3, 1.0, 1.5, 2.0]
    mean, std = statistics.fmean(discounted), statistics.pstdev(discounted)
    got = reinforce_pp_advantages(token_rewards, mask, gamma=0.5)
    assert got[mask.bool()].tolist() == pytest.approx([(r - mean) / std for r in discounted], abs=1e-5)


def test_sequence_advantages_reach_every_real_token_and_the_estimator_sums_token_rewards():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0]])
    assert per_token(torch.tensor([2.0, -1.0, 0.5, 3.0]), mask).tolist() == [
        [2.0, 2.0, 0.0],
        [-1.0, 0.0, 0.0],
        [0.5, 0.5, 0.5],
        [3.0, 0.0, 0.0],
    ]
    # sequence rewards 1 + 2 = 3, 4 (the 7 is padding), 0.5 + 0.5 + 0 = 1, 2: groups [3, 4] and [1, 2]
    token_rewards = torch.tensor([[1.0, 2.0, 0.0], [4.0, 7.0, 0.0], [0.5, 0.5, 0.0], [2.0, 0.0, 0.0]])
    got = critic_free_advantages("dr_grpo", token_rewards, mask, group_size=2)
    assert got.tolist() == [[-0.5, -0.5, 0.0], [0.5, 0.0, 0.0], [-0.5, -0.5, -0.5], [0.5, 0.0, 0.0]]
    with pytest.raises(ValueError, match="unknown critic-free estimator 'gae'"):
        critic_free_advantages("gae", token_rewards, mask, group_size=2)


def test_groups_must_have_two_or_more_responses_and_divide_the_batch():
    assert zero_advantage_groups(torch.tensor([1.0, 1.0, 1.0, 2.0, 3.0, 3.0]), 2) == 2
    with pytest.raises(ValueError, match="group_size must be >= 2, got 1"):
        grpo_advantages(REWARDS, 1)
    with pytest.raises(ValueError, match="8 responses do not split into groups of 3"):
        rloo_advantages(REWARDS, 3)
