"""Read JSON rows from a .jsonl / .jsonl.gz file, a folder of them, or a Hugging Face hub dataset."""

from __future__ import annotations

import gzip
import json
import re
import zlib
from collections.abc import Iterator
from pathlib import Path

from rlhf_ray.formats.rows import DataError, RowProblems, RowRef

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def jsonl_files(path: Path) -> list[Path]:
    """The data files a local path stands for: itself, or the .jsonl/.jsonl.gz files under a folder, in path order."""
    if path.is_file():
        if not path.name.endswith(JSONL_SUFFIXES):
            raise DataError(str(path), "<file>", f"unsupported file type; expected one of {', '.join(JSONL_SUFFIXES)}")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(JSONL_SUFFIXES))
    if not files:
        raise DataError(str(path), "<folder>", f"holds no {' or '.join(JSONL_SUFFIXES)} files")
    return files


def _open_bytes(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _file_rows(path: Path, problems: RowProblems) -> Iterator[tuple[RowRef, dict]]:
    """Rows of one file. Lines are decoded one by one so a bad byte names its line; a damaged
    gzip stream (or an unreadable file) stops the read with an error naming the file."""
    number = 0
    try:
        with _open_bytes(path) as handle:
            for number, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                ref = RowRef(str(path), number)
                try:
                    row = json.loads(raw.decode("utf-8-sig"))
                except UnicodeDecodeError as err:
                    problems.handle(
                        DataError(ref, "<text>", f"not UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1})")
                    )
                    continue
                except json.JSONDecodeError as err:
                    problems.handle(DataError(ref, "<json>", f"not valid JSON ({err.msg} at column {err.colno})"))
                    continue
                if not isinstance(row, dict):
                    problems.handle(DataError(ref, "<json>", f"expected a JSON object, got {type(row).__name__}"))
                    continue
                yield ref, row
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError; a cut-off stream an EOFError
        what = "not a readable gzip file" if path.name.endswith(".gz") else "cannot be read"
        raise DataError(f"{path}:{number + 1}", "<file>", f"{what} ({err})") from err


def _hub_rows(name: str, split: str) -> Iterator[tuple[RowRef, dict]]:
    import datasets  # heavy import, only for hub datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as err:  # the hub client raises many types; name the source in one message
        raise DataError(
            name, "<source>", f"no such local file or folder, and loading it from the Hugging Face hub failed: {err}"
        ) from err
    for index, row in enumerate(dataset):
        yield RowRef(f"hf:{name}[{split}]", index + 1), dict(row)


def iter_rows(source: str, problems: RowProblems, split: str = "train") -> Iterator[tuple[RowRef, dict]]:
    """Yield (where, row) for every JSON object row of `source`."""
    path = Path(source)
    if path.exists():
        for file in jsonl_files(path):
            yield from _file_rows(file, problems)
    elif path.parent.name and path.parent.is_dir():  # `data/pairz`: a typo in a local path, not a hub `owner/name`
        raise DataError(source, "<source>", f"no such file or folder in {path.parent.resolve()}")
    elif _HUB_NAME.match(source) and not source.endswith(JSONL_SUFFIXES):
        yield from _hub_rows(source, split)
    else:
        raise DataError(source, "<source>", "no such file or folder")
