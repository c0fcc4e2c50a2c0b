"""Evaluation statistics checked against numbers worked out by hand (rlhf_ray/algo/evaluation.py)."""

import math

import pytest
import torch

from rlhf_ray.algo.evaluation import mean_and_std, pairwise_summary, pick_calibration_error, sequence_kl, win_rate

pytestmark = pytest.mark.unit


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_pairwise_summary_by_hand():
    # margins: two right, one wrong, one tie; lengths: chosen longer, shorter, equal, longer
    summary = pairwise_summary([2.0, 0.5, -1.0, 0.0], [10, 3, 5, 9], [4, 8, 5, 1])
    assert summary.pairs == 4 and summary.ties == 1
    assert summary.accuracy == pytest.approx(2 / 4)
    assert summary.mean_margin == pytest.approx(1.5 / 4)
    assert summary.longer_chosen == pytest.approx((1 + 0 + 0.5 + 1) / 4)


def test_calibration_error_by_hand():
    # confidences sigmoid(|m|): 0.5 (tie, half right), sigmoid(1)=0.731 twice (one right, one wrong),
    # sigmoid(3)=0.953 (right). Bins of width 0.05 over [0.5, 1]: 0.5 -> bin 0, 0.731 -> bin 4, 0.953 -> bin 9.
    margins = torch.tensor([0.0, 1.0, -1.0, 3.0])
    expected = (1 / 4) * abs(0.5 - 0.5) + (2 / 4) * abs(0.5 - sigmoid(1)) + (1 / 4) * abs(1.0 - sigmoid(3))
    assert pick_calibration_error(margins) == pytest.approx(expected)
    # a perfectly calibrated case: confidence 0.75 in every pair, right in 3 of 4
    m = math.log(3)  # sigmoid(log 3) = 0.75
    assert pick_calibration_error(torch.tensor([m, m, m, -m], dtype=torch.float64)) == pytest.approx(0.0, abs=1e-12)


def test_win_rate_by_hand():
    result = win_rate([3.0, 1.0, 2.0, 0.0], [1.0, 1.0, 5.0, -1.0])  # win, tie, loss, win
    outcomes = torch.tensor([1.0, 0.5, 0.0, 1.0], dtype=torch.float64)
    half = 1.959963984540054 * float(outcomes.std()) / 2
    assert result.rate == pytest.approx(2.5 / 4) and result.n == 4
    assert result.low == pytest.approx(max(0.0, 0.625 - half)) and result.high == pytest.approx(min(1.0, 0.625 + half))
    assert win_rate([1.0, 1.0], [0.0, 0.0]).as_dict() == {"rate": 1.0, "low": 1.0, "high": 1.0, "n": 2}
    with pytest.raises(ValueError, match="equally long"):
        win_rate([1.0], [1.0, 2.0])


def test_sequence_kl_sums_the_log_ratio_over_real_tokens():
    logp = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, -0.5, -0.5]])
    logq = torch.tensor([[-1.5, -1.0, -1.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert sequence_kl(logp, logq, mask).tolist() == pytest.approx([0.5 - 1.0, 1.5])


def test_mean_and_std():
    assert mean_and_std([1.0, 3.0]) == pytest.approx((2.0, math.sqrt(2.0)))
    assert mean_and_std([4.0]) == (4.0, 0.0)
