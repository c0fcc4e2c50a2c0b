"""Tokenized training rows, the train/eval split, per-worker sharding and padding collators."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from rlhf_ray.algo.losses import IGNORE_INDEX
from rlhf_ray.formats.parsers import PreferencePair, SFTExample
from rlhf_ray.tokenization import LengthReport, fit_length, prompt_ids, response_ids


@dataclass
class TokenizedSet:
    rows: list[dict]  # SFT: {input_ids, labels}; pairs: {chosen_ids, rejected_ids}
    lengths: LengthReport = field(default_factory=LengthReport)


def tokenize_sft(examples: list[SFTExample], tokenizer, max_length: int, policy: str) -> TokenizedSet:
    """Prompt + response ids, labels masked to the response tokens only."""
    report, rows = LengthReport(policy), []
    for ex in examples:
        p = prompt_ids(tokenizer, ex.prompt)
        r = response_ids(tokenizer, ex.prompt, ex.response, p)
        p = fit_length(p, [r], max_length, report, ex.ref)
        if p is not None:
            rows.append({"input_ids": p + r, "labels": [IGNORE_INDEX] * len(p) + r})
    return TokenizedSet(rows, report)


def tokenize_pairs(pairs: list[PreferencePair], tokenizer, max_length: int, policy: str) -> TokenizedSet:
    """Full chosen and rejected sequences sharing one (possibly left-truncated) prompt."""
    report, rows = LengthReport(policy), []
    for pair in pairs:
        p = prompt_ids(tokenizer, pair.prompt)
        chosen = response_ids(tokenizer, pair.prompt, pair.chosen, p)
        rejected = response_ids(tokenizer, pair.prompt, pair.rejected, p)
        p = fit_length(p, [chosen, rejected], max_length, report, pair.ref)
        if p is not None:
            rows.append({"chosen_ids": p + chosen, "rejected_ids": p + rejected})
    return TokenizedSet(rows, report)


def split_rows(rows: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """A seeded shuffle, then the last `eval_fraction` of rows held out (at least one when the fraction > 0)."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(rows) * eval_fraction)) if eval_fraction > 0 and len(rows) > 1 else 0
    train = [rows[i] for i in order[: len(rows) - n_eval]]
    held_out = [rows[i] for i in order[len(rows) - n_eval:]]
    return train, held_out


def epoch_batches(n_rows: int, batch_size: int, rank: int, world_size: int, seed: int, epoch: int) -> list[list[int]]:
    """This worker's micro-batches of row indices for one epoch.

    One seeded permutation per epoch, cut into global batches of batch_size * world_size;
    worker `rank` takes its slice of each. A ragged last global batch is dropped so every
    worker runs the same number of steps (the count of dropped rows is visible as
    `len(result) * batch_size * world_size` < n_rows).
    """
    order = list(range(n_rows))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    global_size = batch_size * world_size
    batches = []
    for start in range(0, n_rows - global_size + 1, global_size):
        chunk = order[start: start + global_size]
        batches.append(chunk[rank * batch_size: (rank + 1) * batch_size])
    return batches


def _pad(sequences: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    return torch.tensor([s + [value] * (width - len(s)) for s in sequences], dtype=torch.long)


def _mask(sequences: list[list[int]]) -> torch.Tensor:
    return _pad([[1] * len(s) for s in sequences], 0)


def length_chunks(lengths: list[int], chunk_size: int) -> list[list[int]]:
    """Indices grouped for padded forward passes: sorted by length, `chunk_size` per group, so each group
    pads only to its own longest sequence. chunk_size 0 keeps one group in the original order."""
    if chunk_size <= 0 or chunk_size >= len(lengths):
        return [list(range(len(lengths)))]
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[start:start + chunk_size] for start in range(0, len(order), chunk_size)]


def collate_sft_chunks(rows: list[dict], pad_id: int, chunk_size: int) -> list[dict[str, torch.Tensor]]:
    """collate_sft per length-sorted chunk of `rows` (see length_chunks)."""
    groups = length_chunks([len(r["input_ids"]) for r in rows], chunk_size)
    return [collate_sft([rows[i] for i in group], pad_id) for group in groups]


def collate_pair_chunks(rows: list[dict], pad_id: int, chunk_size: int) -> list[dict[str, torch.Tensor]]:
    """collate_pairs per chunk of pairs, sorted by each pair's longer sequence (see length_chunks)."""
    groups = length_chunks([max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows], chunk_size)
    return [collate_pairs([rows[i] for i in group], pad_id) for group in groups]


def collate_sft(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded (B, T) input_ids, attention_mask and labels."""
    ids = [r["input_ids"] for r in rows]
    return {"input_ids": _pad(ids, pad_id), "attention_mask": _mask(ids),
            "labels": _pad([r["labels"] for r in rows], IGNORE_INDEX)}


def collate_pairs(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """(2B, T): the B chosen sequences, then the B rejected ones, so one forward pass scores both."""
    ids = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
    return {"input_ids": _pad(ids, pad_id), "attention_mask": _mask(ids)}
