import math

import pytest
import torch

from rlhf_ray.algo.losses import IGNORE_INDEX, last_token_index, masked_mean, next_token_loss, pairwise_reward_loss

pytestmark = pytest.mark.unit


def test_pairwise_reward_loss_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    # -log sigmoid(1) = log(1 + e^-1); -log sigmoid(-1) = log(1 + e)
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1))) / 2
    assert pairwise_reward_loss(chosen, rejected).item() == pytest.approx(expected, rel=1e-6)
    # a margin of 1 turns the first difference into 0: -log sigmoid(0) = log 2
    with_margin = (math.log(2) + math.log(1 + math.exp(2))) / 2
    assert pairwise_reward_loss(chosen, rejected, margin=1.0).item() == pytest.approx(with_margin, rel=1e-6)


def test_next_token_loss_scores_only_labelled_tokens():
    vocab = 4
    logits = torch.zeros(1, 3, vocab)
    logits[0, 1, 2] = math.log(3.0)  # position 1 predicts token 2 with p = 3 / (3 + 3) = 0.5
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 2]])
    total, count = next_token_loss(logits, labels)
    assert count.item() == 1
    assert total.item() == pytest.approx(math.log(2.0), rel=1e-6)
    labels = torch.tensor([[IGNORE_INDEX, 1, 2]])  # position 0 predicts token 1 with p = 1/4
    total, count = next_token_loss(logits, labels)
    assert count.item() == 2 and total.item() == pytest.approx(math.log(4.0) + math.log(2.0), rel=1e-6)


def test_masked_mean_and_last_token():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    assert masked_mean(values, mask).item() == pytest.approx((1 + 2 + 5 + 6) / 4)
    assert masked_mean(values, mask, dim=1).tolist() == [1.5, 5.5]
    assert last_token_index(mask).tolist() == [1, 2]
