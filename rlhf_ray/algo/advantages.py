"""Critic-free advantage estimators: GRPO, Dr. GRPO, RLOO and REINFORCE++.

Pure torch, like `rlhf_ray.algo.ppo`. Responses come in groups by prompt: with `group_size` k
(`ppo.responses_per_prompt`), rows [g*k, (g+1)*k) answer prompt g, the order the PPO driver packs
them in. A response's sequence reward is the sum of its per-token rewards (`token_rewards`: the
score on the last token, minus the KL penalty on every token when the KL is kept in the reward).

References (formulas only):
- Shao et al. 2024, "DeepSeekMath" (GRPO, outcome supervision): (r_i - mean_g) / std_g.
- Liu et al. 2025, "Understanding R1-Zero-Like Training" (Dr. GRPO): r_i - mean_g, no std.
- Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from
  Human Feedback in LLMs" (RLOO): r_i minus the mean of the other k - 1 rewards of its group.
- Hu 2025, "REINFORCE++": the token-level return (sum of the rewards from t to the end), whitened
  over the whole batch.

The group std is Bessel-corrected (`torch.std`), with eps 1e-6 added to it, the convention of
verl's `compute_grpo_outcome_advantage` (verl/trainer/ppo/core_algos.py) and TRL's GRPOTrainer.
"""

from __future__ import annotations

import torch

from rlhf_ray.algo.choices import ESTIMATORS
from rlhf_ray.algo.ppo import whiten

GRPO_EPS = 1e-6


def by_group(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) sequence rewards as (B / k, k), one row per prompt; a ValueError when they do not divide."""
    if rewards.dim() != 1:
        raise ValueError(f"sequence rewards must be 1-d (one per response), got shape {tuple(rewards.shape)}")
    if group_size < 2:
        raise ValueError(
            f"group estimators compare the responses of a prompt: group_size must be >= 2, got {group_size}"
        )
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} responses do not split into groups of {group_size}")
    return rewards.reshape(-1, group_size)


@torch.no_grad()
def grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = GRPO_EPS) -> torch.Tensor:
    """GRPO: (r_i - mean of its group) / (std of its group + eps). (B,) -> (B,)."""
    groups = by_group(rewards, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    return (centred / (groups.std(dim=1, keepdim=True) + eps)).reshape(-1)


@torch.no_grad()
def dr_grpo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Dr. GRPO: r_i - mean of its group, without GRPO's division by the group std. (B,) -> (B,)."""
    groups = by_group(rewards, group_size)
    return (groups - groups.mean(dim=1, keepdim=True)).reshape(-1)


@torch.no_grad()
def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO: r_i - (sum of its group - r_i) / (k - 1), the leave-one-out baseline. (B,) -> (B,)."""
    groups = by_group(rewards, group_size)
    others_mean = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others_mean).reshape(-1)


@torch.no_grad()
def reinforce_pp_advantages(
    token_rewards: torch.Tensor, response_mask: torch.Tensor, gamma: float = 1.0
) -> torch.Tensor:
    """REINFORCE++: the return from each token (sum_{s >= t} gamma^(s-t) r_s, to the row's end),
    whitened over every real token of the batch. (B, A) -> (B, A), 0 on padding."""
    mask = response_mask.to(token_rewards.dtype)
    rewards = token_rewards * mask
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        running = rewards[:, t] + gamma * running * mask[:, t]
        returns[:, t] = running
    return whiten(returns, mask)  # (padding's returns are already 0)


def per_token(sequence_advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """A sequence-level advantage on every real token of its response: (B,), (B, A) -> (B, A)."""
    return sequence_advantages.reshape(-1, 1) * response_mask.to(sequence_advantages.dtype)


@torch.no_grad()
def critic_free_advantages(
    estimator: str, token_rewards: torch.Tensor, response_mask: torch.Tensor, group_size: int, gamma: float = 1.0
) -> torch.Tensor:
    """(B, A) advantages of a critic-free `estimator` from (B, A) per-token rewards."""
    if estimator == "reinforce_pp":
        return reinforce_pp_advantages(token_rewards, response_mask, gamma)
    sequence_rewards = (token_rewards * response_mask.to(token_rewards.dtype)).sum(dim=1)
    grouped = {"grpo": grpo_advantages, "dr_grpo": dr_grpo_advantages, "rloo": rloo_advantages}
    if estimator not in grouped:
        raise ValueError(f"unknown critic-free estimator {estimator!r}; expected one of {', '.join(ESTIMATORS[1:])}")
    return per_token(grouped[estimator](sequence_rewards, group_size), response_mask)


@torch.no_grad()
def zero_advantage_groups(rewards: torch.Tensor, group_size: int) -> int:
    """How many prompts got the same reward for every response (a group estimator learns nothing from them)."""
    groups = by_group(rewards, group_size)
    return int((groups == groups[:, :1]).all(dim=1).sum())
