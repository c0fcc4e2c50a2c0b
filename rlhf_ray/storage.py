"""`run.output_dir` as an object-store URI (`s3://bucket/prefix`, `gs://...`, anything pyarrow opens).

Every node works in its own copy of the run folder, at the same local path on each node
(`run.local_copy_dir`), and the store holds the run: a stage's driver fetches the run into its copy, each
worker or actor's node fetches what it reads before it starts, and each writer sends what it completed
(checkpoints, exports, metrics) to the store from the node it runs on. Copies go one file at a time,
newer or different-size files only (a copied file takes its copy's time, so neither side looks newer
afterwards; S3 keeps whole seconds, so a file sent twice within one second at the same size is fetched
once); names that start with a dot (staging folders, markers) are neither listed nor sent.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit


def is_uri(text: str) -> bool:
    return "://" in text


def without_secrets(uri: str) -> str:
    """The URI for messages: user and password taken out."""
    parts = urlsplit(uri)
    host = parts.hostname or ""
    return urlunsplit((parts.scheme, host + (f":{parts.port}" if parts.port else ""), parts.path, "", ""))


def local_copy_path(output_dir: str, name: str, local_copy_dir: str) -> Path:
    """Where each node keeps its copy of the run folder `<output_dir>/<name>`."""
    parts = urlsplit(output_dir)
    inside = f"{parts.hostname or ''}{parts.path}".strip("/")
    return Path(local_copy_dir).expanduser().absolute() / parts.scheme / inside / name


@cache
def _filesystem(output_dir: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(output_dir)


class StoreUnreachable(OSError):
    """The object store of run.output_dir cannot be listed, read or written."""


@dataclass(frozen=True)
class RunStore:
    output_dir: str  # the URI as configured (credentials and options included)
    name: str  # the run folder's name under it
    local: str  # this run's working copy, the same path on every node

    @property
    def shown(self) -> str:
        return f"{without_secrets(self.output_dir).rstrip('/')}/{self.name}"

    def filesystem(self):
        """(pyarrow filesystem, path of the run folder inside it)."""
        fs, base = _filesystem(self.output_dir)
        return fs, f"{base.rstrip('/')}/{self.name}"

    def local_path(self, relative: str = "") -> Path:
        return Path(self.local, relative) if relative else Path(self.local)

    def relative(self, path: str | Path) -> str | None:
        """`path` relative to the working copy, or None when it lies outside it. A path with symbolic links
        resolved (the working copy under a linked folder such as macOS's /tmp) counts as inside too."""
        for candidate, base in (
            (Path(path).absolute(), Path(self.local)),
            (Path(path).resolve(), Path(self.local).resolve()),
        ):
            try:
                inside = candidate.relative_to(base).as_posix()
            except ValueError:
                continue
            return "" if inside == "." else inside
        return None

    def fetch(self, label: str, stage: str | None = None) -> None:
        """This node's working copy of the run brought up to date, said on one line: everything but the Ray Train
        checkpoints (`<stage>/ray`) of stages other than `stage`."""

        def wanted(key: str) -> bool:
            first, _, rest = key.partition("/")
            return first == stage or not rest.startswith("ray/")

        try:
            fetched = self.pull(wanted=wanted)
        except OSError as err:
            raise StoreUnreachable(f"run.output_dir {self.shown}: cannot read the store ({err})") from None
        print(f"[{label}] run folder {self.shown}: {fetched} files fetched into {self.local}", flush=True)

    def pull_paths(self, *paths: str | Path) -> int:
        """`pull` of those of `paths` (absolute, in the working copy) that lie inside the run folder."""
        inside = [r for r in map(self.relative, paths) if r is not None]
        return self.pull(*inside) if inside else 0

    def push_paths(self, *paths: str | Path) -> int:
        """`push` of those of `paths` that lie inside the run folder."""
        inside = [r for r in map(self.relative, paths) if r is not None]
        return self.push(*inside) if inside else 0

    def pull(self, *relatives: str, wanted: Callable[[str], bool] = lambda key: True) -> int:
        """Bring the working copy of each relative path (default: the whole run) up to date from the store; only
        the files whose path in the run folder is `wanted`."""
        fs, root = self.filesystem()
        copied = 0
        for relative in relatives or ("",):
            for key, (size, mtime) in _remote_files(fs, _join(root, relative)).items():
                target = self.local_path(relative) / key if key else self.local_path(relative)
                if wanted(_join(relative, key)) and _stale(target, size, mtime):
                    _download(fs, _join(root, relative, key), target, mtime)
                    copied += 1
        return copied

    def push(self, *relatives: str, delete_missing: bool = False) -> int:
        """Send each relative path of the working copy (default: the whole run) to the store; with
        `delete_missing`, files under it that the working copy no longer has are deleted from the store."""
        return sum(self.send(relative, relative, delete_missing) for relative in relatives or ("",))

    def send(self, relative: str, remote_relative: str, delete_missing: bool = False) -> int:
        """Send the working copy's `relative` file or folder to `remote_relative` in the store; the files that
        mark a folder complete go last, so a folder whose marker is in the store is complete there."""
        fs, root = self.filesystem()
        remote = _remote_files(fs, _join(root, remote_relative))
        local = _local_files(self.local_path(relative))
        copied = 0
        for key, path in sorted(local.items(), key=lambda item: (_marks_completion(item[0]), item[0])):
            stat = path.stat()
            size, mtime = remote.get(key, (-1, 0.0))
            if size != stat.st_size or stat.st_mtime > mtime:
                _upload(fs, path, _join(root, remote_relative, key))
                copied += 1
        if delete_missing:
            for key in remote.keys() - local.keys():
                fs.delete_file(_join(root, remote_relative, key))
        return copied

    def check(self) -> str:
        """Write a marker into the store and return its name (read back by `read_marker` on other nodes)."""
        fs, root = self.filesystem()
        name = f".store-check-{uuid.uuid4().hex}"
        try:
            fs.create_dir(root, recursive=True)
            with fs.open_output_stream(_join(root, name)) as handle:
                handle.write(name.encode())
        except OSError as err:
            raise StoreUnreachable(f"run.output_dir {self.shown}: cannot write to the store ({err})") from None
        return name

    def read_marker(self, name: str) -> str | None:
        fs, root = self.filesystem()
        try:
            with fs.open_input_stream(_join(root, name)) as handle:
                return handle.read().decode()
        except OSError:
            return None

    def delete(self, relative: str) -> None:
        """Delete a file or folder from the store (nothing when it is not there)."""
        import pyarrow.fs

        fs, root = self.filesystem()
        info = fs.get_file_info(_join(root, relative))
        if info.type == pyarrow.fs.FileType.File:
            fs.delete_file(info.path)
        elif info.type == pyarrow.fs.FileType.Directory:
            fs.delete_dir(info.path)


def ray_storage(store: RunStore | None, folder: Path) -> dict:
    """Ray Train's or Ray Tune's storage for `folder` of the run: the folder itself, or, with an object-store
    run folder, its place in the store (every worker then persists its checkpoints there from its own node)."""
    if store is None:
        return {"storage_path": str(folder)}
    fs, root = store.filesystem()
    return {"storage_path": _join(root, store.relative(folder)), "storage_filesystem": fs}


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p)


def _remote_files(fs, root: str) -> dict[str, tuple[int, float]]:
    """{path relative to `root` ('' when `root` is a file): (size, mtime)} of the files under `root`."""
    import pyarrow.fs

    info = fs.get_file_info(root)
    if info.type == pyarrow.fs.FileType.File:
        return {"": (info.size, info.mtime.timestamp())}
    listing = fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True, allow_not_found=True))
    files = {}
    for entry in listing:
        key = entry.path[len(root) :].lstrip("/")
        if entry.type == pyarrow.fs.FileType.File and not _hidden(key):
            files[key] = (entry.size, entry.mtime.timestamp())
    return files


def _local_files(source: Path) -> dict[str, Path]:
    if source.is_file():
        return {"": source}
    if not source.is_dir():
        return {}
    return {
        p.relative_to(source).as_posix(): p
        for p in source.rglob("*")
        if p.is_file() and not _hidden(p.relative_to(source).as_posix())
    }


def _marks_completion(key: str) -> bool:
    """A checkpoint's manifest (checkpoints.py, and each rank's in Ray Train checkpoints) or a finished export's
    `export.json` (models/export.py): present only once the rest of its folder is."""
    name = key.rpartition("/")[2]
    return name == "export.json" or (name.startswith("manifest") and name.endswith(".json"))


def _hidden(key: str) -> bool:
    return any(part.startswith(".") for part in key.split("/"))


def _stale(target: Path, size: int, mtime: float) -> bool:
    try:
        stat = target.stat()
    except FileNotFoundError:
        return True
    return stat.st_size != size or mtime > stat.st_mtime


def _download(fs, source: str, target: Path, mtime: float) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.part")
    with fs.open_input_stream(source) as remote, open(partial, "wb") as local:
        shutil.copyfileobj(remote, local, 1 << 20)
    os.utime(partial, (mtime, mtime))  # the store's time: not newer than the store's copy
    os.replace(partial, target)


def _upload(fs, source: Path, target: str) -> None:
    """Upload, then give the local file the store's time, so that neither side looks newer afterwards."""
    fs.create_dir(target.rpartition("/")[0], recursive=True)
    with open(source, "rb") as local, fs.open_output_stream(target) as remote:
        shutil.copyfileobj(local, remote, 1 << 20)
    stored = fs.get_file_info(target).mtime.timestamp()
    os.utime(source, (stored, stored))
