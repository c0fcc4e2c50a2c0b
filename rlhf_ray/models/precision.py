"""Mixed precision: whether a process computes in bf16, from `model.precision` and its own device.

bf16-mixed keeps the weights (and optimizer state) in fp32 and runs the matmuls in bf16 through
`torch.autocast`; losses, log-probs, KL and rewards are taken in fp32 from the bf16 outputs. Every
process decides for its own device (a cluster's nodes may differ) and says what it chose.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # CPU features with native bf16 matmuls
PRECISIONS = ("fp32", "bf16-mixed", "auto")


@dataclass(frozen=True)
class Precision:
    bf16: bool  # autocast the forward passes to bf16
    why: str  # what was chosen and why, for the process's start-up line

    @property
    def vllm_dtype(self) -> str | None:
        """The dtype a vLLM engine beside a process of this precision uses (None = as model.dtype says)."""
        return "bfloat16" if self.bf16 else None


def cpu_bf16_features(cpuinfo: str | None = None) -> list[str]:
    """Which of BF16_CPU_FLAGS this CPU has (from /proc/cpuinfo; [] where it cannot be read)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return []
    flags = set(next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), []))
    return [flag for flag in BF16_CPU_FLAGS if flag in flags]


def cuda_bf16_supported() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve_precision(
    setting: str, device_type: str = "cpu", *, cpu_features: list[str] | None = None, cuda_bf16: bool | None = None
) -> Precision:
    """The precision a process on `device_type` ("cpu" or "cuda") uses for `model.precision` = `setting`.

    `auto` is bf16-mixed where the device has native bf16 matmuls (a CPU with AMX or AVX512-BF16, a
    GPU with bf16), else fp32. `cpu_features` and `cuda_bf16` stand in for the detection (tests).
    """
    if setting not in PRECISIONS:
        raise ValueError(f"model.precision must be one of {', '.join(PRECISIONS)}, got {setting!r}")
    if setting == "fp32":
        return Precision(False, "fp32 (model.precision)")
    if device_type == "cuda":
        native = cuda_bf16_supported() if cuda_bf16 is None else cuda_bf16
        found = "GPU has bf16" if native else ""
        lacking = "GPU without bf16"
    else:
        features = cpu_bf16_features() if cpu_features is None else cpu_features
        found = f"CPU has {', '.join(features)}" if features else ""
        lacking = "CPU has neither AMX nor AVX512-BF16"
    if setting == "bf16-mixed":
        return Precision(
            True, "bf16-mixed (model.precision)" + ("" if found else f"; {lacking}: no native bf16 matmuls")
        )
    if found:
        return Precision(True, f"bf16-mixed (model.precision auto: {found})")
    return Precision(False, f"fp32 (model.precision auto: {lacking})")


def autocast(precision: Precision, device_type: str = "cpu"):
    """The forward passes' context: bf16 autocast on `device_type` for a bf16 precision, else a no-op."""
    if not precision.bf16:
        return contextlib.nullcontext()
    import torch

    return torch.autocast(device_type, dtype=torch.bfloat16)
