"""Reward functions to use as they are or to copy: verifiers of the kind RL-from-verifiable-rewards uses.

Each takes (prompt, response, fields) and returns a number; name one in the config as
`rlhf_ray.rewards.examples:<function>`.
"""

from __future__ import annotations

import re

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def last_number(text: str) -> str | None:
    found = NUMBER.findall(text.replace(",", ""))
    return found[-1] if found else None


def exact_answer(prompt: str, response: str, fields: dict) -> float:
    """1.0 when the response's last number equals the row's `answer` field, else 0.0."""
    if "answer" not in fields:
        raise KeyError("the prompt row has no 'answer' field")
    found = last_number(response)
    return float(found is not None and float(found) == float(fields["answer"]))


def one_word(prompt: str, response: str, fields: dict) -> float:
    """1.0 for a response of exactly one word (punctuation aside), else 0.0."""
    words = re.findall(r"[\w'-]+", response)
    return float(len(words) == 1)


def brevity(prompt: str, response: str, fields: dict) -> float:
    """Shorter is better: 1 / (1 + number of words), in (0, 1]."""
    return 1.0 / (1.0 + len(response.split()))
