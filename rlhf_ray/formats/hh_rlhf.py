"""Anthropic hh-rlhf transcripts: "\\n\\nHuman: ...\\n\\nAssistant: ..." turns."""

from __future__ import annotations

import re

from rlhf_ray.formats.rows import DataError, Message, RowRef, check_text

_TURN = re.compile(r"\n\n(Human|Assistant): ?")
_ROLE = {"Human": "user", "Assistant": "assistant"}


def split_transcript(text: str, ref: RowRef, field: str) -> tuple[list[Message], str]:
    """Split a transcript into the chat messages before the last Assistant turn and that turn's reply.

    Consecutive turns of the same speaker (seen once in the real data) are
    joined with a blank line, so strict chat templates accept the result.
    """
    check_text(text, ref, field)
    pieces = _TURN.split(text)
    if pieces[0].strip():
        raise DataError(ref, field, "text before the first '\\n\\nHuman:' turn")
    turns = list(zip(pieces[1::2], pieces[2::2]))
    if not turns:
        raise DataError(ref, field, "no '\\n\\nHuman:' or '\\n\\nAssistant:' turns")
    if turns[-1][0] != "Assistant":
        raise DataError(ref, field, "does not end with an '\\n\\nAssistant:' turn")
    response = turns[-1][1].strip()
    if not response:
        raise DataError(ref, field, "the final Assistant response is empty")
    messages: list[Message] = []
    for speaker, content in turns[:-1]:
        role, content = _ROLE[speaker], content.strip()
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] = f"{messages[-1]['content']}\n\n{content}".strip()
        else:
            messages.append({"role": role, "content": content})
    if not messages or messages[0]["role"] != "user":
        raise DataError(ref, field, "no Human turn before the final Assistant turn")
    if any(not m["content"] for m in messages):
        raise DataError(ref, field, "a turn before the final response is empty")
    return messages, response
