"""The types that travel between the PPO driver and its actors, and the packing of sequences.

Shapes: (B, T) full sequence (prompt + response, right-padded); (B, A) response tokens.
Every type here is plain data (tensors, lists, bytes), so it pickles through Ray's object store.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Required, TypedDict

import torch


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # (B, T) prompt + response, right-padded
    attention_mask: torch.Tensor  # (B, T)
    response_ids: torch.Tensor  # (B, A) sampled tokens, right-padded with 0
    response_mask: torch.Tensor  # (B, A) 1 on real response tokens
    positions: torch.Tensor  # (B, A) index into T of the logits that predict each response token

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "response_ids": self.response_ids,
            "response_mask": self.response_mask,
            "positions": self.positions,
        }

    def select(self, rows: torch.Tensor) -> PackedBatch:
        return PackedBatch(**{k: v[rows] for k, v in self.to_dict().items()})

    def to(self, device: torch.device | str) -> PackedBatch:
        return PackedBatch(**{k: v.to(device) for k, v in self.to_dict().items()})


def pack(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> PackedBatch:
    """Concatenate each prompt with its response; the logits at position t predict token t + 1."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    resp_width = max(1, max(len(r) for r in responses))
    batch = len(prompts)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    response_ids = torch.zeros((batch, resp_width), dtype=torch.long)
    response_mask = torch.zeros((batch, resp_width), dtype=torch.long)
    positions = torch.zeros((batch, resp_width), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        if not p:
            raise ValueError(f"row {i}: empty prompt")
        input_ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        attention_mask[i, : len(p) + len(r)] = 1
        response_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        response_mask[i, : len(r)] = 1
        positions[i, : len(r)] = torch.arange(len(p) - 1, len(p) - 1 + len(r))
    return PackedBatch(input_ids, attention_mask, response_ids, response_mask, positions)


def at_response_positions(per_position: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Pick (B, T, ...) values at the (B, A) response positions -> (B, A, ...)."""
    index = positions
    for _ in range(per_position.dim() - 2):
        index = index.unsqueeze(-1)
    index = index.expand(*positions.shape, *per_position.shape[2:])
    return per_position.gather(1, index)


@dataclass
class Experience:
    batch: PackedBatch  # token ids and masks; (B, T) sequences, (B, A) responses
    old_logprobs: torch.Tensor  # (B, A) policy log-probs when the responses were collected
    ref_logprobs: torch.Tensor  # (B, A) reference-policy log-probs
    values: torch.Tensor | None  # (B, A) value estimates when collected; None without a critic
    scores: torch.Tensor  # (B,) sequence rewards (the sources' weighted sum)
    rewards: torch.Tensor  # (B, A) per-token rewards (KL-shaped unless the KL is a loss term)
    advantages: torch.Tensor  # (B, A)
    returns: torch.Tensor | None  # (B, A) the value head's targets; None without a critic

    def select(self, rows: torch.Tensor) -> Experience:
        return self._map(lambda name, value: value.select(rows) if name == "batch" else value[rows])

    def to(self, device: torch.device | str) -> Experience:
        return self._map(lambda name, value: value.to(device))

    def _map(self, change: Callable[[str, Any], Any]) -> Experience:
        """A new Experience with `change(name, value)` of every field that holds data (None stays None)."""
        parts = {f.name: getattr(self, f.name) for f in fields(self)}
        return Experience(**{name: None if value is None else change(name, value) for name, value in parts.items()})


class UpdateStats(TypedDict, total=False):
    """What the learner's `train_step` returns: means over the applied optimizer steps, and counters.

    The means are absent when every step was skipped.
    """

    policy_loss: float
    value_loss: float  # with a critic (gae)
    entropy: float
    clip_fraction: float
    approx_kl: float
    value_clip_fraction: float  # with a critic (gae)
    kl_loss: float  # with ppo.kl_in: loss
    grad_norm: float
    policy_version: Required[int]
    skipped_steps: Required[int]
    update_skipped: Required[float]  # 1.0 when no optimizer step was applied (logged as a metric)
    reused_first_forward: Required[float]  # 1.0 when the first micro-step reused the old-log-prob forward


@dataclass
class PromptRow:
    """What a reward function or server sees of a prompt besides its tokens."""

    text: str  # the prompt's last message
    fields: dict[str, Any]  # the row's extra JSON fields (e.g. a reference `answer`)
    ref: str  # file:line of the row, for error messages


@dataclass
class SamplingSpec:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1  # responses per prompt
    seed: int | None = None  # per-call seed; the generator derives one per prompt from it


@dataclass
class Rollout:
    prompt_index: int  # which prompt of the call this answers
    token_ids: list[int]  # sampled response tokens (EOS included when the model stopped)
    logprobs: list[float]  # vLLM's log-prob of each sampled token (diagnostics only)
    finished: bool  # stopped at EOS rather than at max_new_tokens


@dataclass
class AdapterPayload:
    """A LoRA adapter as bytes, so it can travel through the object store to any node."""

    version: int
    files: dict[str, bytes]  # adapter_config.json, adapter_model.safetensors

    def write(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in self.files.items():
            (folder / name).write_bytes(data)
        return folder


@dataclass
class MergedWeights:
    """The policy's weights with the LoRA update folded in (W + scale * B @ A), by checkpoint name.

    Only the modules around the adapted layers travel, but each of those whole (all of `self_attn`
    for an adapter on `q_proj` alone): vLLM fuses q/k/v and gate/up into one layer and reloads a
    fused layer only in full.
    """

    version: int
    tensors: dict[str, torch.Tensor]
