"""Pack prompts and sampled responses into padded tensors, and read per-response-token outputs back.

Shapes: (B, T) full sequence (prompt + response, right-padded); (B, A) response tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # (B, T) prompt + response, right-padded
    attention_mask: torch.Tensor  # (B, T)
    response_ids: torch.Tensor  # (B, A) sampled tokens, right-padded with 0
    response_mask: torch.Tensor  # (B, A) 1 on real response tokens
    positions: torch.Tensor  # (B, A) index into T of the logits that predict each response token

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "response_ids": self.response_ids,
                "response_mask": self.response_mask, "positions": self.positions}

    def select(self, rows: torch.Tensor) -> "PackedBatch":
        return PackedBatch(**{k: v[rows] for k, v in self.to_dict().items()})

    def to(self, device: torch.device | str) -> "PackedBatch":
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
