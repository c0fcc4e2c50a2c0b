"""Tokenized training rows, the train/eval split, per-worker sharding and padding collators."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from rlhf_ray.algo.losses import IGNORE_INDEX
from rlhf_ray.formats.parsers import PreferencePair, SFTExample
from rlhf_ray.tokenization import LengthReport, fit_length, over_length_untokenized, prompt_ids, response_ids


@dataclass
class TokenizedSet:
    rows: list[dict]  # SFT: {input_ids, labels}; pairs: {chosen_ids, rejected_ids}
    lengths: LengthReport = field(default_factory=LengthReport)


def tokenize_sft(
    examples: list[SFTExample], tokenizer, max_length: int, policy: str, report: LengthReport | None = None
) -> TokenizedSet:
    """Prompt + response ids, labels masked to the response tokens only (`report` to count into an existing one)."""
    report, rows = report or LengthReport(policy), []
    for ex in examples:
        texts = [m["content"] for m in ex.prompt] + [ex.response]
        if over_length_untokenized(texts, tokenizer, max_length, "data.max_length", report, ex.ref):
            continue
        p = prompt_ids(tokenizer, ex.prompt)
        r = response_ids(tokenizer, ex.prompt, ex.response, p)
        p = fit_length(p, [r], max_length, report, ex.ref)
        if p is not None:
            rows.append({"input_ids": p + r, "labels": [IGNORE_INDEX] * len(p) + r})
    return TokenizedSet(rows, report)


def tokenize_pairs(
    pairs: list[PreferencePair], tokenizer, max_length: int, policy: str, report: LengthReport | None = None
) -> TokenizedSet:
    """Full chosen and rejected sequences sharing one (possibly left-truncated) prompt."""
    report, rows = report or LengthReport(policy), []
    for pair in pairs:
        texts = [m["content"] for m in pair.prompt] + [max(pair.chosen, pair.rejected, key=len)]
        if over_length_untokenized(texts, tokenizer, max_length, "data.max_length", report, pair.ref):
            continue
        p = prompt_ids(tokenizer, pair.prompt)
        chosen = response_ids(tokenizer, pair.prompt, pair.chosen, p)
        rejected = response_ids(tokenizer, pair.prompt, pair.rejected, p)
        p = fit_length(p, [chosen, rejected], max_length, report, pair.ref)
        if p is not None:
            rows.append({"chosen_ids": p + chosen, "rejected_ids": p + rejected})
    return TokenizedSet(rows, report)


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
        chunk = order[start : start + global_size]
        batches.append(chunk[rank * batch_size : (rank + 1) * batch_size])
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
    return [order[start : start + chunk_size] for start in range(0, len(order), chunk_size)]


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
    return {
        "input_ids": _pad(ids, pad_id),
        "attention_mask": _mask(ids),
        "labels": _pad([r["labels"] for r in rows], IGNORE_INDEX),
    }


def shared_prompt_pair_chunks(rows: list[dict], pad_id: int, chunk_size: int) -> list[dict[str, torch.Tensor]]:
    """collate_shared_prompt_pairs per chunk of pairs, sorted by packed length (see length_chunks)."""
    groups = length_chunks([packed_pair_length(r) for r in rows], chunk_size)
    return [collate_shared_prompt_pairs([rows[i] for i in group], pad_id) for group in groups]


def shared_prefix_length(a: list[int], b: list[int]) -> int:
    """How many leading tokens two sequences share, short of the last token of either."""
    limit, n = min(len(a), len(b)) - 1, 0
    while n < limit and a[n] == b[n]:
        n += 1
    return n


def packed_pair_length(row: dict) -> int:
    """Tokens a pair takes when its shared prefix is run once: what the reward model actually computes."""
    chosen, rejected = row["chosen_ids"], row["rejected_ids"]
    return len(chosen) + len(rejected) - shared_prefix_length(chosen, rejected)


def pooled_index(ids: list[int], pad_id: int) -> int:
    """The token a sequence-classification head scores: the rightmost one that is not `pad_id`
    (transformers' pooling for right- or left-padded batches)."""
    return next((i for i in range(len(ids) - 1, -1, -1) if ids[i] != pad_id), 0)


SHARED, CHOSEN, REJECTED, PADDING = 0, 1, 2, -1


def collate_shared_prompt_pairs(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """(B, T) rows laid out as [shared prefix, rest of chosen, rest of rejected], right-padded.

    Rejected tokens take the positions they have in their own sequence and attend to the shared prefix
    and to themselves, never to chosen tokens; so one pass gives every token the hidden state it gets in
    a pass over its own sequence, and the common prompt (most of an hh-rlhf pair) is computed once.
    `attention_mask` is (B, 1, T, T) boolean, True where a query may attend a key; padding attends only to
    itself. `chosen_at` / `rejected_at` are the positions the score is read at (see pooled_index), and
    `sequence_tokens` the length of chosen plus rejected, the tokens the pair stands for.
    """
    width = max(packed_pair_length(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    segment = torch.full((len(rows), width), PADDING, dtype=torch.long)
    chosen_at, rejected_at, sequence_tokens = [], [], 0
    for b, row in enumerate(rows):
        chosen, rejected = row["chosen_ids"], row["rejected_ids"]
        shared = shared_prefix_length(chosen, rejected)
        end = len(chosen) + len(rejected) - shared  # packed_pair_length
        ids[b, :end] = torch.tensor(chosen + rejected[shared:])
        positions[b, : len(chosen)] = torch.arange(len(chosen))
        positions[b, len(chosen) : end] = torch.arange(shared, len(rejected))
        segment[b, :shared], segment[b, shared : len(chosen)], segment[b, len(chosen) : end] = SHARED, CHOSEN, REJECTED
        chosen_at.append(pooled_index(chosen, pad_id))
        j = pooled_index(rejected, pad_id)
        rejected_at.append(j if j < shared else len(chosen) + j - shared)
        sequence_tokens += len(chosen) + len(rejected)
    return {
        "input_ids": ids,
        "position_ids": positions,
        "attention_mask": segment_attention(segment, shared=SHARED),
        "chosen_at": torch.tensor(chosen_at),
        "rejected_at": torch.tensor(rejected_at),
        "sequence_tokens": torch.tensor(sequence_tokens),
    }


def segment_attention(segment: torch.Tensor, shared: int | None = None) -> torch.Tensor:
    """(B, 1, T, T) boolean attention of (B, T) segment ids: causal, each token sees its own segment (and the
    `shared` one); PADDING sees only itself (a row of all False would give NaN attention)."""
    width = segment.shape[1]
    query, key = segment[:, :, None], segment[:, None, :]
    same = key == query if shared is None else (key == shared) | (key == query)
    allowed = torch.ones(width, width, dtype=torch.bool).tril() & (query != PADDING) & same
    return (allowed | torch.eye(width, dtype=torch.bool))[:, None]


def first_fit_bins(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices grouped first-fit decreasing into bins of at most `capacity` tokens."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        slot = next((b for b, free in enumerate(room) if free >= lengths[i]), None)
        if slot is None:
            bins.append([i])
            room.append(capacity - lengths[i])
        else:
            bins[slot].append(i)
            room[slot] -= lengths[i]
    return bins


def collate_packed_sft(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """SFT sequences laid end to end (first-fit decreasing) in rows no longer than the longest sequence, so no
    token attends over a longer row than it would unpacked; right-padded.

    `attention_mask` (B, 1, T, T) keeps each sequence to itself and `position_ids` restart at each, so every
    token gets the hidden state of a pass over its own sequence. A sequence's first label is never scored
    (the previous sequence's last token must not learn to predict it). `sequence_tokens`: the real tokens.
    """
    lengths = [len(r["input_ids"]) for r in rows]
    ids, labels, positions, segments = [], [], [], []
    for members in first_fit_bins(lengths, max(lengths)):
        ids.append([t for i in members for t in rows[i]["input_ids"]])
        labels.append([t for i in members for t in [IGNORE_INDEX] + rows[i]["labels"][1:]])
        positions.append([p for i in members for p in range(len(rows[i]["input_ids"]))])
        segments.append([k for k, i in enumerate(members) for _ in rows[i]["input_ids"]])
    return {
        "input_ids": _pad(ids, pad_id),
        "labels": _pad(labels, IGNORE_INDEX),
        "position_ids": _pad(positions, 0),
        "attention_mask": segment_attention(_pad(segments, PADDING)),
        "sequence_tokens": torch.tensor(sum(lengths)),
    }


def collate_pairs(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """(2B, T): the B chosen sequences, then the B rejected ones, so one forward pass scores both."""
    ids = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
    return {"input_ids": _pad(ids, pad_id), "attention_mask": _mask(ids)}
