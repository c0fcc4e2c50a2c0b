"""Checkpoint folders that cannot lie: staged, fsynced, renamed into place, with a manifest written last.

A folder counts as a checkpoint only if its `manifest.json` exists and every file it lists
has the recorded size and SHA-256. Anything else (a crash mid-write, a truncated or
flipped file, a deleted manifest) is reported by `problem_with` and skipped by `newest_valid`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

MANIFEST = "manifest.json"
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class CheckpointError(RuntimeError):
    """Resume was asked for but no usable checkpoint exists, or it belongs to another model."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(folder: Path, meta: dict, name: str = MANIFEST) -> dict:
    """fsync every file under `folder`, then write the manifest (sizes, checksums, `meta`) atomically."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != name):
        _fsync(path)
        files[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "sha256": sha256_of(path)}
    manifest = {**meta, "files": files}
    partial = folder / f".{name}.partial"
    partial.write_text(json.dumps(manifest, indent=2) + "\n")
    _fsync(partial)
    os.replace(partial, folder / name)
    _fsync(folder)
    return manifest


def read_manifest(folder: Path, name: str = MANIFEST) -> dict:
    return json.loads((folder / name).read_text())


def shape_problem(manifest, name: str = MANIFEST) -> str | None:
    """None if `manifest` has the shape `write_manifest` writes: an object whose `files` maps paths inside the
    folder to an integer `size` and a hex SHA-256."""
    if not isinstance(manifest, dict):
        return f"{name} is not a JSON object"
    files = manifest.get("files")
    if not isinstance(files, dict):
        return f"{name} has no `files` object"
    for relative, entry in files.items():
        if relative.startswith("/") or ".." in Path(relative).parts:
            return f"{name} lists {relative!r}, a path outside the checkpoint folder"
        size, digest = (entry.get("size"), entry.get("sha256")) if isinstance(entry, dict) else (None, None)
        if type(size) is not int or size < 0 or not (isinstance(digest, str) and SHA256_HEX.fullmatch(digest)):
            return f"{name}: the entry of {relative} needs a `size` (bytes) and a `sha256` (64 hex digits)"
    return None


def problem_with(
    folder: Path, name: str = MANIFEST, checksums: bool = True, required: Iterable[str] = ()
) -> str | None:
    """None if `folder` matches its manifest and the manifest lists every `required` file, else what is wrong
    (for the warning)."""
    try:
        manifest = read_manifest(folder, name)
    except FileNotFoundError:
        return f"no {name} (the write did not finish)"
    except (OSError, ValueError) as err:
        return f"unreadable {name}: {err}"
    shape = shape_problem(manifest, name)
    if shape:
        return shape
    unlisted = [relative for relative in required if relative not in manifest["files"]]
    if unlisted:
        return f"{name} does not list {', '.join(unlisted)}, which a resume needs"
    for relative, expected in manifest["files"].items():
        path = folder / relative
        if not path.is_file():
            return f"{relative} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{relative} has {path.stat().st_size} bytes, the manifest says {expected['size']}"
        if checksums and sha256_of(path) != expected["sha256"]:
            return f"{relative} does not match its SHA-256 in the manifest"
    return None


def commit(staging: Path, target: Path) -> Path:
    """Replace `target` with the finished `staging` folder (a rename; the old one goes only after)."""
    old = target.with_name(f".old-{target.name}")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    _fsync(target.parent)
    shutil.rmtree(old, ignore_errors=True)
    return target


def newest_valid(folder: Path, pattern: str, log=print, required: Iterable[str] = ()) -> Path | None:
    """The newest folder matching `pattern` (sorted by name) whose manifest checks out and lists `required`.

    Every newer one that does not is named in a warning through `log`.
    """
    if not folder.is_dir():
        return None
    for candidate in sorted(folder.glob(pattern), reverse=True):
        problem = problem_with(candidate, required=required)
        if problem is None:
            return candidate
        log(f"WARNING: skipping checkpoint {candidate}: {problem}")
    return None


def prune(folder: Path, pattern: str, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (called after a new one is committed)."""
    complete = [c for c in sorted(folder.glob(pattern)) if (c / MANIFEST).is_file()]
    for old in complete[:-keep] if keep > 0 else complete:
        shutil.rmtree(old, ignore_errors=True)
