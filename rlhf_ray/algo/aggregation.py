"""How a minibatch's per-token losses become one number (`ppo.loss_aggregation`).

A minibatch may be run as several micro-batches whose gradients accumulate. Each micro-batch's
share is normalised by the *minibatch's* totals, so the shares add up to exactly the loss of the
whole minibatch, whatever the micro-batch size.

- `token-mean`: sum over every real token of the minibatch / their number. Long responses weigh
  more, token for token (DAPO's token-level loss; Yu et al. 2025).
- `seq-mean-token-mean`: each response's mean over its tokens, then the mean over responses
  (the GRPO paper's loss; Shao et al. 2024). A short response's tokens weigh more.
- `seq-mean-token-sum-norm`: each response's sum over its tokens divided by one constant (the
  response length cap), then the mean over responses (Dr. GRPO; Liu et al. 2025): no length bias.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf_ray.algo.choices import LOSS_AGGREGATIONS


@dataclass(frozen=True)
class LossAggregation:
    """Reduces a micro-batch's (B, A) per-token losses to its share of the minibatch loss."""

    mode: str
    rows: int  # responses in the whole minibatch
    tokens: int  # real response tokens in the whole minibatch
    max_tokens: int  # the constant of seq-mean-token-sum-norm (the response length cap)

    def __post_init__(self):
        if self.mode not in LOSS_AGGREGATIONS:
            raise ValueError(f"unknown loss aggregation {self.mode!r}; expected one of {', '.join(LOSS_AGGREGATIONS)}")

    @classmethod
    def over(cls, mode: str, response_mask: torch.Tensor, max_tokens: int | None = None) -> LossAggregation:
        """The aggregation of a minibatch run as one micro-batch (`max_tokens` defaults to its width)."""
        rows, width = response_mask.shape
        return cls(mode, rows, int(response_mask.sum()), max_tokens or width)

    def __call__(self, per_token: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
        mask = response_mask.to(per_token.dtype)
        masked = per_token * mask
        if self.mode == "token-mean":
            return masked.sum() / max(self.tokens, 1)
        if self.mode == "seq-mean-token-mean":
            return (masked.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).sum() / max(self.rows, 1)
        return masked.sum() / (max(self.rows, 1) * self.max_tokens)
