"""PPO math for RLHF: KL estimators, per-token rewards, GAE, whitening, losses and KL controllers.

Pure torch: tensors and floats in, tensors out; no Ray, DeepSpeed, vLLM or config objects.
Shapes: `(B, A)` is batch x response tokens. `response_mask` (B, A) is 1 on real response
tokens and 0 on the padding after each response's end (right padding: a row's real tokens
come first, contiguously).

References (formulas only):
- Schulman et al. 2017, "Proximal Policy Optimization Algorithms" (clipped surrogate).
- Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
  Estimation" (GAE).
- Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences" (KL-penalised
  reward, adaptive KL coefficient); Ouyang et al. 2022 (InstructGPT) use the same reward.
- J. Schulman, "Approximating KL Divergence" (2020 note): the k1, k2, k3 estimators.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from rlhf_ray.algo.choices import KL_ESTIMATORS
from rlhf_ray.algo.losses import last_token_index, masked_mean


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probs. (B, A) -> (B, A).

    With r = ref_logprobs - logprobs (log of p_ref / p_policy at a token sampled from the policy):
    k1 = -r (unbiased, can be negative), k2 = r^2 / 2 (biased, low variance),
    k3 = exp(r) - 1 - r (unbiased and never negative).
    """
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


@torch.no_grad()
def token_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    kl_coef: float,
    estimator: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO rewards: -kl_coef * KL on every real token, plus the sequence score on the last one.

    scores: (B,) reward-model score per response; logprobs, ref_logprobs, response_mask: (B, A).
    Returns (rewards, kl), both (B, A) and 0 on padding; kl is returned for logging.
    A row with no real token gets no score (all zeros).
    """
    mask = response_mask.to(logprobs.dtype)
    kl = kl_penalty(logprobs, ref_logprobs, estimator) * mask
    rewards = -kl_coef * kl
    last = last_token_index(response_mask).unsqueeze(1)  # (B, 1)
    has_tokens = mask.sum(dim=1, keepdim=True) > 0  # (B, 1)
    score = torch.where(has_tokens, scores.to(rewards.dtype).reshape(-1, 1), 0.0)  # empty rows get nothing
    rewards.scatter_add_(1, last, score)
    return rewards, kl


@torch.no_grad()
def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over the response tokens. All (B, A) -> (advantages, returns).

    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma * lam * A_{t+1}, computed
    backwards. The episode ends at each row's last real token, so the value after it is 0;
    rewards and values on padding are masked to 0 first, so padding never leaks into the
    recursion and gets advantage 0 (and return 0). returns = advantages + values. No gradient.
    """
    mask = response_mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.size(1))):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages, advantages + values


def _masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Population (biased) variance of `values` where `mask` is 1, as a 0-d tensor."""
    mean = masked_mean(values, mask)
    return masked_mean((values - mean).square(), mask)


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise the masked entries of `values` to mean 0 and (population) std 1. Any shape -> same shape.

    Mean and variance are taken over all masked elements together (the whole batch).
    With shift_mean=False only the scale changes: the mean is added back after dividing.
    Padding positions (mask 0) are returned as 0.
    """
    mean = masked_mean(values, mask)
    whitened = (values - mean) * torch.rsqrt(_masked_var(values, mask) + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(values.dtype)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_range: float,
    *,
    clip_range_low: float | None = None,
    clip_range_high: float | None = None,
    aggregate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = masked_mean,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate loss (Schulman et al. 2017). All inputs (B, A).

    Per token: max(-A * ratio, -A * clip(ratio, 1 - low, 1 + high)) with ratio = exp(logprobs - old_logprobs)
    and low = high = `clip_range` unless `clip_range_low` / `clip_range_high` set one side (DAPO's
    asymmetric "clip-higher"); reduced by `aggregate` (default: the mean over real tokens; see
    `algo/aggregation.py`). Gradient flows through `logprobs` only. Stats (0-d, detached, means over
    real tokens): `clip_fraction`, the share where the clipped term is strictly larger (binds), and
    `approx_kl`, the mean of 0.5 * (logprobs - old_logprobs)^2.
    """
    low = clip_range if clip_range_low is None else clip_range_low
    high = clip_range if clip_range_high is None else clip_range_high
    advantages = advantages.detach()
    log_ratio = logprobs - old_logprobs.detach()
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - low, 1.0 + high)
    loss = aggregate(torch.maximum(unclipped, clipped), response_mask)
    with torch.no_grad():
        stats = {
            "clip_fraction": masked_mean((clipped > unclipped).to(logprobs.dtype), response_mask),
            "approx_kl": masked_mean(0.5 * log_ratio.square(), response_mask),
        }
    return loss, stats


def kl_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    estimator: str,
    aggregate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = masked_mean,
) -> torch.Tensor:
    """KL(policy || reference) as a loss term (`ppo.kl_in: loss`, as GRPO does): the per-token `estimator`
    (see `kl_penalty`) reduced by `aggregate`. Gradient flows through `logprobs` only. Inputs (B, A)."""
    return aggregate(kl_penalty(logprobs, ref_logprobs.detach(), estimator), response_mask)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    clip_range_value: float,
    aggregate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = masked_mean,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: 0.5 * `aggregate` of max((v - R)^2, (clip(v, old - c, old + c) - R)^2). Inputs (B, A).

    `aggregate` defaults to the mean over real tokens (see `algo/aggregation.py`).

    Gradient flows through `values` only. Stats (0-d, detached): `value_clip_fraction`, the
    share of real tokens where the clipped error is strictly larger (binds).
    """
    old_values, returns = old_values.detach(), returns.detach()
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    unclipped_error = (values - returns).square()
    clipped_error = (clipped_values - returns).square()
    loss = 0.5 * aggregate(torch.maximum(unclipped_error, clipped_error), response_mask)
    with torch.no_grad():
        binds = (clipped_error > unclipped_error).to(values.dtype)
        stats = {"value_clip_fraction": masked_mean(binds, response_mask)}
    return loss, stats


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """float16 / bfloat16 logits as float32; other dtypes unchanged."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution over the last dim. (..., V) -> (...).

    H = sum_i entr(p_i) with entr(p) = -p log p and entr(0) = 0, so logits of -inf (masked-out
    tokens) contribute 0 with no special case. Half-precision logits are computed in float32.
    """
    return torch.special.entr(torch.softmax(_upcast(logits), dim=-1)).sum(dim=-1)


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Log-softmax of `logits` gathered at `tokens`: (B, T, V), (B, T) -> (B, T).

    Computed as z[token] - logsumexp(z), one batch row at a time, so the full (B, T, V)
    log-softmax is never materialised (peak extra memory is one row's (T, V)).
    Half-precision logits give float32 log-probs.
    """
    picked = _upcast(logits.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1))
    normaliser = torch.stack([torch.logsumexp(_upcast(row), dim=-1) for row in logits])
    return picked - normaliser


def nonfinite_names(tensors: dict[str, torch.Tensor], mask: torch.Tensor) -> list[str]:
    """Names of the tensors holding a NaN or inf. (B, A) tensors are checked where `mask` is set
    (padding is not data); any other shape is checked whole."""
    bad = []
    for name, tensor in tensors.items():
        values = tensor[mask.bool()] if tensor.shape == mask.shape else tensor
        if not bool(torch.isfinite(values).all()):
            bad.append(name)
    return bad


@torch.no_grad()
def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[returns - values] / Var[returns] over masked elements, as a 0-d tensor. Inputs (B, A).

    1 means the value head predicts the returns exactly, 0 means no better than their mean,
    negative means worse. When Var[returns] is 0 (constant returns, or no masked element) the
    ratio is undefined; we return 0 rather than nan or inf so logged curves stay plottable.
    """
    var_returns = _masked_var(returns, mask)
    var_error = _masked_var(returns - values, mask)
    ratio = var_error / torch.where(var_returns > 0, var_returns, torch.ones_like(var_returns))
    return torch.where(var_returns > 0, 1.0 - ratio, torch.zeros_like(ratio))


class KLController(Protocol):
    """What the PPO driver needs of a KL coefficient schedule."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> None: ...


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. 2019, steering the measured KL towards `target`.

    error = clip(current_kl / target - 1, -0.2, 0.2); value *= 1 + error * n_steps / horizon.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be positive, got target={target}, horizon={horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move `value` after a batch of `n_steps` samples whose mean KL was `current_kl`."""
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon


class FixedKLController:
    """Constant KL coefficient with the same interface as AdaptiveKLController."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Keep `value` unchanged."""
