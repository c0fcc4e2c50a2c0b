"""Row references, the data error type, and counting of skipped rows."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

BadRowPolicy = Literal["error", "skip"]
Message = dict  # {"role": "system" | "user" | "assistant", "content": str}
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class RowRef:
    """Where a row came from: a file (or hub dataset) and a 1-based line."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


class DataError(ValueError):
    """A malformed row, named by file, line and field."""

    def __init__(self, ref: RowRef | str, field: str, problem: str):
        self.ref, self.field, self.problem = ref, field, problem
        whole_source = isinstance(ref, str) and field.startswith("<")  # e.g. "<file>": no row, no field to name
        super().__init__(f"{ref}: {problem}" if whole_source else f"{ref}: field '{field}': {problem}")

    def __reduce__(self):  # picklable and copyable with its three parts (Ray and Tune copy exceptions)
        return (DataError, (self.ref, self.field, self.problem))


@dataclass
class RowProblems:
    """Rows skipped under `on_bad_row: skip`, counted by problem, with a few locations each."""

    policy: BadRowPolicy = "error"
    counts: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)  # problem -> first few "file:line"

    def handle(self, err: DataError) -> None:
        """Raise under the error policy; otherwise count the row as skipped."""
        if self.policy == "error":
            raise err
        self.record(err)

    def record(self, err: DataError) -> None:
        key = f"{err.field}: {err.problem}"
        self.counts[key] += 1
        self.examples.setdefault(key, [])
        if len(self.examples[key]) < 5:
            self.examples[key].append(str(err.ref))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.counts:
            return "no problems"
        lines = [f"{self.total} rows skipped:"]
        for key, n in self.counts.most_common():
            lines.append(f"  {n} x {key} (e.g. {', '.join(self.examples[key])})")
        return "\n".join(lines)


def check_text(value, ref: RowRef, field_name: str) -> str:
    """A non-empty string, or a DataError naming the field."""
    if not isinstance(value, str):
        raise DataError(ref, field_name, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(ref, field_name, "is empty")
    return value


def check_messages(value, ref: RowRef, field_name: str) -> list[Message]:
    """A non-empty list of {role, content} chat messages."""
    if not isinstance(value, list) or not value:
        got = "an empty list" if isinstance(value, list) else type(value).__name__
        raise DataError(ref, field_name, f"expected a non-empty list of chat messages, got {got}")
    messages = []
    for i, msg in enumerate(value):
        where = f"{field_name}[{i}]"
        if not isinstance(msg, dict) or set(msg) - {"role", "content"} or "role" not in msg or "content" not in msg:
            raise DataError(ref, where, "expected an object with exactly 'role' and 'content'")
        if msg["role"] not in ROLES:
            raise DataError(ref, f"{where}.role", f"must be one of {list(ROLES)}, got {msg['role']!r}")
        messages.append({"role": msg["role"], "content": check_text(msg["content"], ref, f"{where}.content")})
    return messages


def as_messages(value, ref: RowRef, field_name: str) -> list[Message]:
    """A prompt given as a plain string (one user turn) or as chat messages."""
    if isinstance(value, str):
        return [{"role": "user", "content": check_text(value, ref, field_name)}]
    check_string_or_list(value, ref, field_name)
    messages = check_messages(value, ref, field_name)
    if messages[-1]["role"] == "assistant":
        raise DataError(ref, field_name, "a prompt must not end with an assistant message")
    return messages


def check_string_or_list(value, ref: RowRef, field_name: str) -> None:
    """For fields that take a string or chat messages: name both in the error for any other type."""
    if not isinstance(value, (str, list)):
        raise DataError(
            ref, field_name, f"expected a non-empty list of chat messages or a string, got {type(value).__name__}"
        )
