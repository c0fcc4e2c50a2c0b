"""The marker of a finished model export: `export.json`, written last, with every file's size and SHA-256."""

from __future__ import annotations

from pathlib import Path

from rlhf_ray.checkpoints import problem_with, write_manifest

COMPLETE_MARKER = "export.json"  # written last, with every file's size and SHA-256; without it, not finished


def mark_exported(folder: Path, summary: dict) -> None:
    write_manifest(folder, summary, name=COMPLETE_MARKER)


def is_exported(folder: str | Path) -> bool:
    """A finished export whose files still have the sizes recorded when it was written."""
    folder = Path(folder)
    return (folder / COMPLETE_MARKER).is_file() and problem_with(folder, COMPLETE_MARKER, checksums=False) is None
