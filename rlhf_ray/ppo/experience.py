"""The typed batch of experience PPO learns from."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from rlhf_ray.ppo.sequences import PackedBatch


@dataclass
class Experience:
    batch: PackedBatch  # token ids and masks; (B, T) sequences, (B, A) responses
    old_logprobs: torch.Tensor  # (B, A) policy log-probs when the responses were collected
    ref_logprobs: torch.Tensor  # (B, A) reference-policy log-probs
    values: torch.Tensor  # (B, A) value estimates when collected
    scores: torch.Tensor  # (B,) reward-model scores (normalised, clipped)
    rewards: torch.Tensor  # (B, A) KL-shaped per-token rewards
    advantages: torch.Tensor  # (B, A)
    returns: torch.Tensor  # (B, A)

    def select(self, rows: torch.Tensor) -> "Experience":
        return Experience(**{name: value.select(rows) if name == "batch" else value[rows] for name, value in self._parts().items()})

    def to(self, device: torch.device | str) -> "Experience":
        return Experience(**{name: value.to(device) for name, value in self._parts().items()})

    def _parts(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}
