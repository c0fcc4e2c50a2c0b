"""Held-out splits decided by a seeded hash of the prompt, so one prompt is in the same split in every stage.

Each prompt maps to a number u in [0, 1) (SHA-256 of the seed and the prompt's chat messages):

    u < test_fraction                    -> "test"   (policy evaluation; no stage trains on it)
    u < test_fraction + eval_fraction    -> "eval"   (each stage's own evaluation; PPO never samples it)
    otherwise                            -> "train"

A prompt that appears in the SFT data, the preference pairs and the PPO prompts lands in the same
split in all three, whatever file or order it comes in. A second, independent number splits the
training prompts into two disjoint halves ("a", "b"), for example to train a second reward model
that a policy was not optimised against.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from typing import Literal, TypeVar

from rlhf_ray.formats.rows import Message

Split = Literal["train", "eval", "test"]
SplitOrAll = Literal["train", "eval", "test", "all"]
TrainPart = Literal["all", "a", "b"]
T = TypeVar("T")


def prompt_numbers(prompt: Sequence[Message], seed: int) -> tuple[float, float]:
    """Two independent numbers in [0, 1) for a prompt: its split draw and its training-half draw."""
    key = json.dumps(list(prompt), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64, int.from_bytes(digest[8:16], "big") / 2**64


def split_of(prompt: Sequence[Message], seed: int, eval_fraction: float, test_fraction: float) -> Split:
    draw, _ = prompt_numbers(prompt, seed)
    return _split_for(draw, eval_fraction, test_fraction)


def in_train_part(prompt: Sequence[Message], seed: int, part: TrainPart) -> bool:
    """Whether a training prompt belongs to `part` ("all", or one of the two disjoint halves)."""
    _, half = prompt_numbers(prompt, seed)
    return _in_part(half, part)


def _split_for(draw: float, eval_fraction: float, test_fraction: float) -> Split:
    if draw < test_fraction:
        return "test"
    return "eval" if draw < test_fraction + eval_fraction else "train"


def _in_part(half: float, part: TrainPart) -> bool:
    return part == "all" or (half < 0.5) == (part == "a")


def partition(
    examples: Iterable[T], *, seed: int, eval_fraction: float, test_fraction: float, train_part: TrainPart = "all"
) -> dict[str, list[T]]:
    """Examples (anything with a `.prompt`) by split, in their input order: "train" (narrowed to
    `train_part`), "eval", "test", and "other" (the training half not chosen)."""
    parts: dict[str, list[T]] = {"train": [], "eval": [], "test": [], "other": []}
    for example in examples:
        draw, half = prompt_numbers(example.prompt, seed)
        split = _split_for(draw, eval_fraction, test_fraction)
        if split == "train" and not _in_part(half, train_part):
            split = "other"
        parts[split].append(example)
    return parts


def select(
    examples: Iterable[T],
    split: SplitOrAll,
    *,
    seed: int,
    eval_fraction: float,
    test_fraction: float,
    train_part: TrainPart = "all",
) -> list[T]:
    """The examples of one split ("all": every example); `train_part` narrows the training split."""
    if split == "all":
        return list(examples)
    return partition(
        examples, seed=seed, eval_fraction=eval_fraction, test_fraction=test_fraction, train_part=train_part
    )[split]
