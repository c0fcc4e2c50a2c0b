"""Supervised losses: masked next-token loss (SFT) and the pairwise reward-model loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt and padding)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is 1 (over `dim`, or everything)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of predicting labels[:, t+1] from logits[:, t], and the number of scored tokens.

    logits: (B, T, V); labels: (B, T) with IGNORE_INDEX on prompt and padding.
    Returned as (sum, count) so data-parallel workers can average over all tokens.
    """
    shifted_logits = logits[:, :-1].reshape(-1, logits.size(-1)).float()
    shifted_labels = labels[:, 1:].reshape(-1)
    total = F.cross_entropy(shifted_logits, shifted_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total, (shifted_labels != IGNORE_INDEX).sum()


def response_token_loss(hidden: torch.Tensor, labels: torch.Tensor, head) -> tuple[torch.Tensor, torch.Tensor]:
    """next_token_loss computed from the last hidden states, projecting only the positions that carry a label.

    hidden: (B, T, H) backbone output; head: the LM head (H -> V). Prompt and padding positions never
    reach the vocabulary projection, which is most of an SFT batch's logits.
    """
    shifted_labels = labels[:, 1:]
    scored = shifted_labels != IGNORE_INDEX
    logits = head(hidden[:, :-1][scored]).float()
    total = F.cross_entropy(logits, shifted_labels[scored], reduction="sum")
    return total, scored.sum()


def pairwise_reward_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """-log sigmoid(r_chosen - r_rejected - margin), averaged over pairs. chosen, rejected: (B,)."""
    return -F.logsigmoid(chosen.float() - rejected.float() - margin).mean()


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-pad token of each row of a (B, T) attention mask (either padding side)."""
    positions = torch.arange(attention_mask.size(1), device=attention_mask.device)
    return (attention_mask.bool() * positions).amax(dim=1)
