"""Turn one JSON row of each supported format into typed examples."""

from __future__ import annotations

from dataclasses import dataclass, field

from rlhf_ray.formats.hh_rlhf import split_transcript
from rlhf_ray.formats.rows import (
    DataError,
    Message,
    RowRef,
    as_messages,
    check_messages,
    check_string_or_list,
    check_text,
)


@dataclass
class PreferencePair:
    prompt: list[Message]
    chosen: str
    rejected: str
    ref: RowRef


@dataclass
class SFTExample:
    prompt: list[Message]
    response: str  # the loss is taken on these tokens only
    ref: RowRef


@dataclass
class PromptExample:
    prompt: list[Message]
    ref: RowRef
    fields: dict = field(default_factory=dict)  # the row's other keys (prompts format), e.g. a reference `answer`


def _require(row: dict, ref: RowRef, *keys: str) -> None:
    for key in keys:
        if key not in row:
            raise DataError(ref, key, f"missing (row has keys: {', '.join(sorted(row)) or 'none'})")


def _distinct(pair: PreferencePair) -> PreferencePair:
    if pair.chosen.strip() == pair.rejected.strip():
        raise DataError(pair.ref, "rejected", "identical to 'chosen'")
    return pair


def hh_rlhf_pair(row: dict, ref: RowRef) -> PreferencePair:
    """Two full transcripts sharing every turn but the last Assistant reply."""
    _require(row, ref, "chosen", "rejected")
    chosen_prompt, chosen = split_transcript(row["chosen"], ref, "chosen")
    rejected_prompt, rejected = split_transcript(row["rejected"], ref, "rejected")
    if chosen_prompt != rejected_prompt:
        raise DataError(
            ref, "rejected", "its turns before the final Assistant reply differ from 'chosen' (no shared prompt)"
        )
    return _distinct(PreferencePair(chosen_prompt, chosen, rejected, ref))


def _response(value, prompt: list[Message], ref: RowRef, field: str) -> str:
    """A response as a string, or as messages ending in the assistant reply (earlier turns must equal the prompt)."""
    if isinstance(value, str):
        return check_text(value, ref, field).strip()
    check_string_or_list(value, ref, field)
    messages = check_messages(value, ref, field)
    if messages[-1]["role"] != "assistant":
        raise DataError(ref, field, "the last message must be the assistant's response")
    if messages[:-1] and messages[:-1] != prompt:
        raise DataError(ref, field, "its turns before the response differ from 'prompt'")
    return messages[-1]["content"].strip()


def split_pair(row: dict, ref: RowRef) -> PreferencePair:
    """`prompt` / `chosen` / `rejected`, each a string or chat messages."""
    _require(row, ref, "prompt", "chosen", "rejected")
    prompt = as_messages(row["prompt"], ref, "prompt")
    chosen = _response(row["chosen"], prompt, ref, "chosen")
    rejected = _response(row["rejected"], prompt, ref, "rejected")
    return _distinct(PreferencePair(prompt, chosen, rejected, ref))


def self_instruct_examples(row: dict, ref: RowRef) -> list[SFTExample]:
    """`instruction` + `instances[{input, output}]`: one example per instance.

    Prompt: the instruction, then the input when it is not empty; target: the output.
    """
    _require(row, ref, "instruction", "instances")
    instruction = check_text(row["instruction"], ref, "instruction").strip()
    instances = row["instances"]
    if not isinstance(instances, list) or not instances:
        raise DataError(ref, "instances", "expected a non-empty list of {input, output}")
    examples = []
    for i, instance in enumerate(instances):
        where = f"instances[{i}]"
        if not isinstance(instance, dict):
            raise DataError(ref, where, "expected an object with 'input' and 'output'")
        if "output" not in instance:
            raise DataError(ref, f"{where}.output", "missing")
        given = instance.get("input", "")
        if not isinstance(given, str):
            raise DataError(ref, f"{where}.input", f"expected a string, got {type(given).__name__}")
        output = check_text(instance["output"], ref, f"{where}.output").strip()
        text = f"{instruction}\n\n{given.strip()}" if given.strip() else instruction
        examples.append(SFTExample([{"role": "user", "content": text}], output, ref))
    return examples


def prompt_completion_example(row: dict, ref: RowRef) -> SFTExample:
    _require(row, ref, "prompt", "completion")
    prompt = as_messages(row["prompt"], ref, "prompt")
    return SFTExample(prompt, _response(row["completion"], prompt, ref, "completion"), ref)


def prompt_only(row: dict, ref: RowRef) -> PromptExample:
    """A `prompts` row: `prompt`, and any other keys as fields for reward functions."""
    _require(row, ref, "prompt")
    fields = {key: value for key, value in row.items() if key != "prompt"}
    return PromptExample(as_messages(row["prompt"], ref, "prompt"), ref, fields)
