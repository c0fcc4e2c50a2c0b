"""Chat-template tokenization and the explicit over-length policy.

Sequences longer than `max_length` are never cut silently: the policy is
`error`, `skip` (counted), or `truncate_prompt` (drop prompt tokens from the
left, keep the whole response; counted).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

from rlhf_ray.formats.rows import DataError, Message, RowRef

OverlongPolicy = Literal["error", "skip", "truncate_prompt"]


def render_ids(tokenizer, messages: Sequence[Message], add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer, prompt: Sequence[Message]) -> list[int]:
    """Token ids of a chat prompt, ending with the assistant generation header."""
    return render_ids(tokenizer, prompt, add_generation_prompt=True)


def response_ids(
    tokenizer, prompt: Sequence[Message], response: str, prompt_tokens: list[int] | None = None
) -> list[int]:
    """Token ids of an assistant reply as the chat template renders it after `prompt` (end-of-turn included)."""
    prompt_tokens = prompt_ids(tokenizer, prompt) if prompt_tokens is None else prompt_tokens
    full = render_ids(tokenizer, [*prompt, {"role": "assistant", "content": response}], add_generation_prompt=False)
    if full[: len(prompt_tokens)] == prompt_tokens:
        return full[len(prompt_tokens) :]
    # Templates whose prompt rendering is not a prefix of the full rendering: reply text + EOS.
    return tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


@dataclass
class LengthReport:
    """Counts of what the over-length policy did."""

    policy: OverlongPolicy = "error"
    seen: int = 0
    counts: Counter = field(default_factory=Counter)  # "truncated" / "skipped"

    def summary(self) -> str:
        if not self.counts:
            return f"{self.seen} sequences, none over length"
        done = ", ".join(f"{n} {what}" for what, n in sorted(self.counts.items()))
        return f"{self.seen} sequences, over length under policy '{self.policy}': {done}"


def fit_length(
    prompt: list[int],
    responses: Sequence[list[int]],
    max_length: int,
    report: LengthReport,
    ref: RowRef,
    min_prompt_tokens: int = 1,
) -> list[int] | None:
    """Apply the over-length policy to a prompt followed by each of `responses` (one for SFT, two for pairs).

    Returns the prompt to use (possibly left-truncated), or None when the row is skipped.
    """
    report.seen += 1
    longest = max(len(r) for r in responses)
    if len(prompt) + longest <= max_length:
        return prompt
    if longest == 0:  # a prompt on its own (PPO): its budget is data.max_prompt_length
        problem, setting = f"prompt {len(prompt)} tokens > max_prompt_length {max_length}", "data.max_prompt_length"
    else:
        problem, setting = (
            f"prompt {len(prompt)} + response {longest} tokens > max_length {max_length}",
            "data.max_length",
        )
    if report.policy == "error":
        raise DataError(
            ref, "<length>", f"{problem} (raise {setting}, or set data.overlong to 'skip' or 'truncate_prompt')"
        )
    if report.policy == "truncate_prompt" and max_length - longest >= min_prompt_tokens:
        report.counts["truncated"] += 1
        return prompt[len(prompt) + longest - max_length :]
    report.counts["skipped"] += 1
    return None


@lru_cache(maxsize=8)
def longest_token_chars(tokenizer) -> int:
    """Characters of the vocabulary's longest entry: no token covers more characters of a text than that."""
    return max(len(token) for token in tokenizer.get_vocab())


def over_length_untokenized(
    texts: Sequence[str], tokenizer, max_length: int, setting: str, report: LengthReport, ref: RowRef
) -> bool:
    """Under 'error' and 'skip', a row whose texts hold more characters than `max_length` tokens can cover is
    refused or skipped (True) before it is tokenized: a 20 MB line would take minutes to tokenize."""
    chars = sum(len(text) for text in texts)
    if report.policy == "truncate_prompt" or chars <= max_length * longest_token_chars(tokenizer):
        return False
    report.seen += 1
    if report.policy == "error":
        raise DataError(
            ref,
            "<length>",
            f"{chars} characters, more than {max_length} tokens can hold ({setting} {max_length}; raise it, or "
            "set data.overlong to 'skip' or 'truncate_prompt')",
        )
    report.counts["skipped"] += 1
    return True
