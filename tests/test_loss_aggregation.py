"""Loss aggregation, asymmetric clipping and the KL loss term, against numbers worked out by hand."""

import math

import pytest
import torch

from rlhf_ray.algo.aggregation import LossAggregation
from rlhf_ray.algo.ppo import kl_loss, policy_loss

# Two responses: 3 real tokens with losses 1, 2, 3 and 1 real token with loss 6 (the 9 is padding).
LOSSES = torch.tensor([[1.0, 2.0, 3.0], [6.0, 9.0, 9.0]])
MASK = torch.tensor([[1, 1, 1], [1, 0, 0]])


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("token-mean", (1 + 2 + 3 + 6) / 4),  # every real token weighs the same: 3.0
        ("seq-mean-token-mean", ((1 + 2 + 3) / 3 + 6 / 1) / 2),  # (2 + 6) / 2 = 4.0
        ("seq-mean-token-sum-norm", ((1 + 2 + 3) / 4 + 6 / 4) / 2),  # sums over the constant 4: 1.5
    ],
)
def test_each_aggregation_by_hand(mode, expected):
    assert LossAggregation.over(mode, MASK, max_tokens=4)(LOSSES, MASK).item() == pytest.approx(expected)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batch_shares_add_up_to_the_whole_minibatch(mode):
    whole = LossAggregation.over(mode, MASK, max_tokens=4)
    shares = [whole(LOSSES[i : i + 1], MASK[i : i + 1]) for i in range(2)]
    assert sum(shares).item() == pytest.approx(whole(LOSSES, MASK).item())


def test_sum_norm_defaults_to_the_batch_width_and_unknown_modes_are_refused():
    assert LossAggregation.over("seq-mean-token-sum-norm", MASK).max_tokens == 3
    with pytest.raises(ValueError, match="unknown loss aggregation 'mean'"):
        LossAggregation.over("mean", MASK)


def test_clip_range_high_lets_a_positive_advantage_ratio_rise_further():
    # ratio 1.25, A = 1: symmetric 0.2 clips at 1.2 (loss -1.2); clip-higher 0.28 leaves it (-1.25)
    old = torch.zeros(1, 1)
    logprobs = torch.full((1, 1), math.log(1.25))
    advantages, mask = torch.ones(1, 1), torch.ones(1, 1)
    symmetric, stats = policy_loss(logprobs, old, advantages, mask, clip_range=0.2)
    assert symmetric.item() == pytest.approx(-1.2) and stats["clip_fraction"].item() == 1.0
    higher, stats = policy_loss(logprobs, old, advantages, mask, clip_range=0.2, clip_range_high=0.28)
    assert higher.item() == pytest.approx(-1.25) and stats["clip_fraction"].item() == 0.0


def test_clip_range_low_bounds_a_negative_advantage_ratio_from_below():
    # ratio 0.7, A = -1: max(0.7, clip(0.7, 1 - low, ...)); low 0.2 -> 0.8 binds; low 0.4 -> 0.7 stays
    old = torch.zeros(1, 1)
    logprobs = torch.full((1, 1), math.log(0.7))
    advantages, mask = -torch.ones(1, 1), torch.ones(1, 1)
    assert policy_loss(logprobs, old, advantages, mask, 0.2)[0].item() == pytest.approx(0.8)
    assert policy_loss(logprobs, old, advantages, mask, 0.2, clip_range_low=0.4)[0].item() == pytest.approx(0.7)


def test_policy_loss_takes_the_aggregation():
    logprobs = torch.zeros(2, 3)
    advantages = -LOSSES  # at ratio 1 the per-token loss is -A
    aggregate = LossAggregation.over("seq-mean-token-mean", MASK)
    loss, _ = policy_loss(logprobs, logprobs.clone(), advantages, MASK, 0.2, aggregate=aggregate)
    assert loss.item() == pytest.approx(4.0)


def test_kl_loss_k3_by_hand_and_its_gradient():
    # policy log-prob log 0.5, reference log 0.25: r = log(0.25 / 0.5) = -log 2; k3 = exp(r) - 1 - r = 0.5 - 1 + log 2
    logprobs = torch.full((1, 2), math.log(0.5), requires_grad=True)
    ref = torch.full((1, 2), math.log(0.25))
    loss = kl_loss(logprobs, ref, torch.tensor([[1, 0]]), "k3")
    assert loss.item() == pytest.approx(-0.5 + math.log(2))
    loss.backward()
    # d k3 / d logp = -exp(r) + 1 = 0.5 on the real token (mean over 1 token); padding gets none
    assert logprobs.grad[0].tolist() == pytest.approx([0.5, 0.0])


def test_kl_loss_k1_is_the_mean_log_ratio():
    logprobs, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    assert kl_loss(logprobs, ref, torch.ones(1, 2), "k1").item() == pytest.approx((0.5 - 1.0) / 2)
