"""Evaluation statistics: reward-model accuracy and calibration, policy win-rates and KL.

Plain numbers in, plain numbers out (lists of floats or tensors); no models, no Ray.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

Z95 = 1.959963984540054  # two-sided 95% normal quantile


@dataclass
class PairwiseSummary:
    pairs: int
    accuracy: float  # share of pairs with margin > 0 (a tie counts as wrong, as in RM training's eval_accuracy)
    ties: int  # pairs with margin exactly 0 (identical texts score the same)
    mean_margin: float  # mean of r_chosen - r_rejected
    calibration_error: float  # expected calibration error of sigmoid(|margin|) as the confidence of the pick
    longer_chosen: float  # length baseline: share of pairs whose chosen response is longer (equal = 1/2)

    def as_dict(self) -> dict:
        return asdict(self)


def pairwise_summary(
    margins: Sequence[float], chosen_lengths: Sequence[int], rejected_lengths: Sequence[int], bins: int = 10
) -> PairwiseSummary:
    """How a reward model ranks preference pairs, beside what 'pick the longer one' would score."""
    m = torch.as_tensor(margins, dtype=torch.float64)
    if m.numel() == 0:
        raise ValueError("no pairs to summarise")
    chosen = torch.as_tensor(chosen_lengths, dtype=torch.float64)
    rejected = torch.as_tensor(rejected_lengths, dtype=torch.float64)
    longer = (chosen > rejected).double() + 0.5 * (chosen == rejected).double()
    return PairwiseSummary(
        pairs=m.numel(),
        accuracy=float((m > 0).double().mean()),
        ties=int((m == 0).sum()),
        mean_margin=float(m.mean()),
        calibration_error=pick_calibration_error(m, bins),
        longer_chosen=float(longer.mean()),
    )


def pick_calibration_error(margins: torch.Tensor, bins: int = 10) -> float:
    """Expected calibration error of the reward model's pick between the two responses of each pair.

    The pick is the higher-scored response, its confidence sigmoid(|margin|) in [0.5, 1], and it is
    correct when it is the chosen one (a tie: half right). Confidences fall in `bins` equal-width bins
    over [0.5, 1]; ECE = sum over bins of (share of pairs) * |accuracy - mean confidence|.
    """
    m = torch.as_tensor(margins, dtype=torch.float64)
    confidence = torch.sigmoid(m.abs())
    correct = (m > 0).double() + 0.5 * (m == 0).double()
    which = ((confidence - 0.5) * 2 * bins).long().clamp(0, bins - 1)
    error = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            error += float(members.double().mean() * (correct[members].mean() - confidence[members].mean()).abs())
    return error


@dataclass
class WinRate:
    rate: float  # mean of 1 (win), 1/2 (tie), 0 (loss) over compared samples
    low: float  # 95% confidence interval (normal approximation over the per-sample outcomes)
    high: float
    n: int

    def as_dict(self) -> dict:
        return asdict(self)


def win_rate(rewards: Sequence[float], baseline_rewards: Sequence[float]) -> WinRate:
    """How often a policy's response beats the baseline's response to the same prompt (same sample index)."""
    a = torch.as_tensor(rewards, dtype=torch.float64)
    b = torch.as_tensor(baseline_rewards, dtype=torch.float64)
    if a.shape != b.shape or a.numel() == 0:
        raise ValueError(f"win_rate needs two equally long, non-empty lists, got {a.numel()} and {b.numel()}")
    outcome = (a > b).double() + 0.5 * (a == b).double()
    rate, n = float(outcome.mean()), a.numel()
    half_width = Z95 * float(outcome.std(unbiased=True)) / math.sqrt(n) if n > 1 else float("inf")
    return WinRate(rate, max(0.0, rate - half_width), min(1.0, rate + half_width), n)


def sequence_kl(logprobs: torch.Tensor, baseline_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) sum over response tokens of log p(y_t) - log q(y_t) for responses sampled from p.

    Its mean over samples of p estimates KL(p || q) in nats per response (the k1 estimator: unbiased,
    a single sample may be negative).
    """
    return ((logprobs - baseline_logprobs) * mask).sum(-1)


def mean_and_std(values: Sequence[float]) -> tuple[float, float]:
    v = torch.as_tensor(values, dtype=torch.float64)
    return float(v.mean()), float(v.std(unbiased=True)) if v.numel() > 1 else 0.0
