"""The names of the dataset formats, and which kinds of example each can be read as (no imports: the config uses it)."""

from __future__ import annotations

from typing import Literal, get_args

Format = Literal["hh-rlhf", "pairs", "self-instruct", "prompt-completion", "prompts"]
FORMATS: tuple[str, ...] = get_args(Format)

# The kind of example a format holds, and the formats each kind can be read from: preference pairs
# only from pair formats; SFT examples from anything with a target (a pair's chosen reply included);
# prompts from every format.
KIND_OF_FORMAT = {
    "hh-rlhf": "preference",
    "pairs": "preference",
    "self-instruct": "sft",
    "prompt-completion": "sft",
    "prompts": "prompts",
}
FORMATS_OF_KIND: dict[str, tuple[str, ...]] = {
    "preference": ("hh-rlhf", "pairs"),
    "sft": ("hh-rlhf", "pairs", "self-instruct", "prompt-completion"),
    "prompts": FORMATS,
}
