"""`rlhf-ray data inspect`: counts, token-length percentiles and problems of a dataset source."""

from __future__ import annotations

import json

from rlhf_ray.formats.load import Loaded, detect_format, load_examples
from rlhf_ray.formats.names import KIND_OF_FORMAT
from rlhf_ray.formats.rows import RowProblems
from rlhf_ray.formats.sources import iter_rows
from rlhf_ray.tokenization import prompt_ids, response_ids

PERCENTILES = (50, 90, 99, 100)


def percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile of an ascending list."""
    rank = max(1, -(-len(sorted_values) * q // 100))  # ceil
    return sorted_values[int(rank) - 1]


def resolve_format(source: str, fmt: str, split: str = "train") -> str:
    if fmt != "auto":
        return fmt
    for ref, row in iter_rows(source, RowProblems("skip"), split):
        return detect_format(row, ref)
    return "prompts"  # empty source: loading reports it


def token_lengths(loaded: Loaded, tokenizer) -> dict[str, list[int]]:
    """Per-example token counts of each part, as the chat template renders them."""
    columns: dict[str, list[int]] = {}
    for ex in loaded.examples:
        p = prompt_ids(tokenizer, ex.prompt)
        parts = {"prompt": len(p)}
        if hasattr(ex, "chosen"):
            chosen, rejected = (len(response_ids(tokenizer, ex.prompt, r, p)) for r in (ex.chosen, ex.rejected))
            parts.update(chosen=chosen, rejected=rejected, longest_total=len(p) + max(chosen, rejected))
        elif hasattr(ex, "response"):
            response = len(response_ids(tokenizer, ex.prompt, ex.response, p))
            parts.update(response=response, total=len(p) + response)
        for name, n in parts.items():
            columns.setdefault(name, []).append(n)
    return {name: sorted(values) for name, values in columns.items()}


def extra_fields(loaded: Loaded) -> dict[str, int]:
    """How many prompt rows carry each extra field (prompts format), in order of first appearance."""
    counts: dict[str, int] = {}
    for ex in loaded.examples:
        for key in getattr(ex, "fields", {}):
            counts[key] = counts.get(key, 0) + 1
    return counts


def inspect_source(source: str, fmt: str, tokenizer, max_length: int | None = None, split: str = "train") -> str:
    """A printable report; bad rows are listed as problems rather than raised."""
    fmt = resolve_format(source, fmt, split)
    kind = KIND_OF_FORMAT[fmt]
    loaded = load_examples(kind, source, fmt, on_bad_row="skip", split=split)
    lines = [
        f"source: {source}",
        f"format: {fmt} (read as {kind} examples)",
        f"rows read: {loaded.rows_read}",
        f"valid {kind} examples: {len(loaded.examples)}",
        f"tokens ({tokenizer.name_or_path}), percentiles " + "/".join(f"p{q}" for q in PERCENTILES) + ":",
    ]
    columns = token_lengths(loaded, tokenizer)
    for name, values in columns.items():
        lines.append(
            f"  {name:>14}: "
            + " / ".join(str(percentile(values, q)) for q in PERCENTILES)
            + f"   (mean {sum(values) / len(values):.1f})"
        )
    if max_length is not None:
        total = columns.get("longest_total") or columns.get("total") or columns["prompt"]
        over = sum(1 for n in total if n > max_length)
        lines.append(f"over max_length {max_length}: {over} of {len(total)}")
    fields = extra_fields(loaded)
    if fields:
        counts = ", ".join(f"{key} ({n} rows)" for key, n in fields.items())
        lines.append(f"extra fields (reach reward functions): {counts}")
        example = next(ex for ex in loaded.examples if getattr(ex, "fields", None))
        lines.append(f"  e.g. {example.ref}: {json.dumps(example.fields, ensure_ascii=False)[:200]}")
    lines.append("problems: " + loaded.problems.summary())
    return "\n".join(lines)
