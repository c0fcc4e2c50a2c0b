"""What every reward source must return, checked with the row named when it does not."""

from __future__ import annotations

import math
import numbers

import torch

from rlhf_ray.wire import PromptRow


class RewardError(RuntimeError):
    """A reward source failed or returned something unusable; the message names the source and the row."""


def row_name(rows: list[PromptRow], index: int) -> str:
    return f"row {index} of the batch ({rows[index].ref})"


def as_reward(value, source: str, rows: list[PromptRow], index: int) -> float:
    """`value` as a finite float (bool and int count), else a RewardError naming `source` and the row."""
    if isinstance(value, numbers.Real):  # bool, int, float and numpy's numbers
        number = float(value)
    elif isinstance(value, torch.Tensor) and value.numel() == 1:
        number = float(value)
    else:
        raise RewardError(
            f"{source} returned {value!r} ({type(value).__name__}) for {row_name(rows, index)}; expected a number"
        )
    if not math.isfinite(number):
        raise RewardError(f"{source} returned {number} for {row_name(rows, index)}; rewards must be finite")
    return number


def checked_rewards(values, source: str, rows: list[PromptRow]) -> torch.Tensor:
    """A batch's rewards as a (B,) float32 tensor: one finite number per row, else a RewardError."""
    try:
        values = list(values)
    except TypeError:
        raise RewardError(
            f"{source} returned {type(values).__name__}; expected a list of {len(rows)} numbers"
        ) from None
    if len(values) != len(rows):
        raise RewardError(f"{source} returned {len(values)} rewards for {len(rows)} responses; expected one each")
    return torch.tensor([as_reward(v, source, rows, i) for i, v in enumerate(values)], dtype=torch.float32)
