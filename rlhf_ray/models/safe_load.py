"""Checkpoint files read back without running code: torch's weights-only unpickler, everywhere.

A run folder may sit on shared storage that others can write, and its manifest's SHA-256 checks
integrity, not origin: a pickle planted there must not run at the next resume. Every `.pt` file a
resume reads goes through `weights_only_load`, which accepts tensors, plain containers and the three
DeepSpeed types its optimizer files hold, and refuses any other global (`os.system`, a class of a
planted module) with `UnsafeCheckpoint` before calling it. DeepSpeed's own loader passes
`weights_only=False`; `load_deepspeed_checkpoint` runs `engine.load_checkpoint` with its file reads
swapped for `weights_only_load`.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from rlhf_ray.checkpoints import CheckpointError


class UnsafeCheckpoint(CheckpointError):
    """A checkpoint file asks the unpickler for code that is not on the allowed list; it was not loaded."""


def deepspeed_saved_types() -> list:
    """The non-tensor types DeepSpeed 0.19 writes into its ZeRO 1-3 optimizer files (fp32 and bf16): read off
    `torch.serialization.get_unsafe_globals_in_checkpoint` of real checkpoints; all three are plain records."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def weights_only_load(path: str | Path, map_location=None, allowed: list | None = None):
    """`torch.load(path, weights_only=True)` with `allowed` types (default: none beyond torch's own)."""
    try:
        with torch.serialization.safe_globals(allowed or []):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f"the global {found.group(1)}" if found else str(err).splitlines()[0]
        raise UnsafeCheckpoint(
            f"{path}: refused to load: it asks for {what}, which is not a tensor or a type a checkpoint of "
            "this project holds. Nothing in it was run. Someone or something other than rlhf-ray wrote this "
            "file; restore the run folder from a copy you trust, or move it away to start afresh"
        ) from None


class _WeightsOnlyReads:
    """A DeepSpeed checkpoint engine whose `load` is `weights_only_load`; everything else is the engine's own."""

    def __init__(self, inner):
        self._inner = inner

    def load(self, path: str, map_location=None):
        return weights_only_load(path, map_location, deepspeed_saved_types())

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


def load_deepspeed_checkpoint(engine, folder: str | Path, **kwargs):
    """`engine.load_checkpoint(folder, **kwargs)`, every file read by `weights_only_load`.

    DeepSpeed's universal-checkpoint path reads its files with `torch.load` directly, so it is refused."""
    if engine.load_universal_checkpoint():
        raise ValueError("DeepSpeed's load_universal_checkpoint is not supported: its loader unpickles arbitrary code")
    own = engine.checkpoint_engine
    engine.checkpoint_engine = _WeightsOnlyReads(own)
    try:
        return engine.load_checkpoint(str(folder), **kwargs)
    finally:
        engine.checkpoint_engine = own
