"""Load a dataset source as preference pairs, SFT examples, or PPO prompts.

Every malformed row raises a `DataError` naming file, line and field, or under
`on_bad_row="skip"` is counted in the returned `RowProblems`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from rlhf_ray.formats import parsers
from rlhf_ray.formats.names import FORMATS, FORMATS_OF_KIND
from rlhf_ray.formats.rows import BadRowPolicy, DataError, RowProblems, RowRef
from rlhf_ray.formats.sources import iter_rows

T = TypeVar("T")


def detect_format(row: dict, ref: RowRef) -> str:
    """Guess a row's format from its keys (used for `format: auto`)."""
    keys = set(row)
    if {"chosen", "rejected"} <= keys:
        return "pairs" if "prompt" in keys else "hh-rlhf"
    if {"instruction", "instances"} <= keys:
        return "self-instruct"
    if {"prompt", "completion"} <= keys:
        return "prompt-completion"
    if "prompt" in keys:
        return "prompts"
    raise DataError(
        ref, "<format>", f"cannot tell the format from keys {sorted(keys)}; set format to one of {list(FORMATS)}"
    )


Parser = Callable[[dict, RowRef], list]


def _pair_parser(fmt: str) -> Callable[[dict, RowRef], parsers.PreferencePair]:
    return {"hh-rlhf": parsers.hh_rlhf_pair, "pairs": parsers.split_pair}[fmt]


def _as_pairs(fmt: str) -> Parser:
    parse_pair = _pair_parser(fmt)
    return lambda row, ref: [parse_pair(row, ref)]


def _as_sft(fmt: str) -> Parser:
    if fmt == "self-instruct":
        return parsers.self_instruct_examples
    if fmt == "prompt-completion":
        return lambda row, ref: [parsers.prompt_completion_example(row, ref)]
    parse_pair = _pair_parser(fmt)

    def chosen_as_target(row: dict, ref: RowRef) -> list:  # preference data: fine-tune on the chosen reply
        pair = parse_pair(row, ref)
        return [parsers.SFTExample(pair.prompt, pair.chosen, pair.ref)]

    return chosen_as_target


def _as_prompts(fmt: str) -> Parser:
    if fmt == "prompts":
        return lambda row, ref: [parsers.prompt_only(row, ref)]
    parse = _as_pairs(fmt) if fmt in FORMATS_OF_KIND["preference"] else _as_sft(fmt)
    return lambda row, ref: [parsers.PromptExample(ex.prompt, ex.ref) for ex in parse(row, ref)]


# How each kind of example is read from a format (which formats it can be read from: formats/names.py).
PARSER_OF_KIND: dict[str, Callable[[str], Parser]] = {"preference": _as_pairs, "sft": _as_sft, "prompts": _as_prompts}


@dataclass
class Loaded(Generic[T]):
    examples: list[T]
    rows_read: int
    format: str
    problems: RowProblems = field(default_factory=RowProblems)


def load_examples(
    kind: str,
    source: str,
    fmt: str = "auto",
    *,
    on_bad_row: BadRowPolicy = "error",
    split: str = "train",
    limit: int | None = None,
) -> Loaded:
    """Read `source` as `kind` examples ("preference", "sft" or "prompts")."""
    allowed, parser_for = FORMATS_OF_KIND[kind], PARSER_OF_KIND[kind]
    if fmt != "auto" and fmt not in allowed:
        raise DataError(source, "format", f"{kind} data cannot be read from format {fmt!r}; use one of {list(allowed)}")
    problems = RowProblems(on_bad_row)
    examples: list = []
    rows_read = row_problems = 0
    parse = parser_for(fmt) if fmt != "auto" else None
    detected_at = None  # the row `format: auto` read the format from
    for ref, row in iter_rows(source, problems, split):
        rows_read += 1
        if parse is None:
            fmt, detected_at = detect_format(row, ref), ref
            if fmt not in allowed:
                raise DataError(ref, "<format>", f"looks like {fmt!r} rows, which cannot be read as {kind} data")
            parse = parser_for(fmt)
        try:
            examples.extend(parse(row, ref))
        except DataError as err:
            if detected_at is not None and detected_at.file != ref.file:
                err = DataError(
                    err.ref,
                    err.field,
                    f"{err.problem} (read as {fmt!r} rows: `format: auto` took the format from {detected_at}; "
                    "set the format, or keep one format per folder)",
                )
            problems.handle(err)
            row_problems += 1
        if limit is not None and len(examples) >= limit:
            examples = examples[:limit]
            break
    rows_read += problems.total - row_problems  # rows skipped before parsing (bad JSON, not an object)
    if not examples:
        why = "it holds no rows" if rows_read == 0 else problems.summary()
        raise DataError(source, "<rows>", f"no valid {kind} rows ({rows_read} read; {why})")
    return Loaded(examples, rows_read, fmt, problems)


def load_preference_pairs(source: str, fmt: str = "auto", **kwargs) -> Loaded[parsers.PreferencePair]:
    return load_examples("preference", source, fmt, **kwargs)


def load_sft_examples(source: str, fmt: str = "auto", **kwargs) -> Loaded[parsers.SFTExample]:
    return load_examples("sft", source, fmt, **kwargs)


def load_prompts(source: str, fmt: str = "auto", **kwargs) -> Loaded[parsers.PromptExample]:
    return load_examples("prompts", source, fmt, **kwargs)
