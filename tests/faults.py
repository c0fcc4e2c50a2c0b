"""Faults that tests inject: into the SFT/RM jobs through `run_stage(after_step=...)`, and into run folders."""

import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import ray.cloudpickle
import torch


@dataclass
class FailOnce:
    """Raise once, on rank min(1, world - 1), after optimizer step `step`; the marker file makes it once only."""

    step: int
    marker: str
    world: int = 2

    def __call__(self, step: int, rank: int) -> None:
        if step == self.step and rank == min(1, self.world - 1) and not Path(self.marker).exists():
            Path(self.marker).write_text(f"failed at step {step}\n")
            raise RuntimeError(f"injected failure at step {step} on rank {rank}")


@dataclass
class KillOnce:
    """SIGKILL the worker process of rank min(1, world - 1) after optimizer step `step`, as the OOM killer or a
    lost node would end it (no exception, no clean-up); the marker file makes it once only."""

    step: int
    marker: str
    world: int = 2

    def __call__(self, step: int, rank: int) -> None:
        if step == self.step and rank == min(1, self.world - 1) and not Path(self.marker).exists():
            Path(self.marker).write_text(f"killed at step {step}\n")
            os.kill(os.getpid(), signal.SIGKILL)


class RunsAShellCommand:
    """Unpickling this runs `command`: what someone with write access to a run folder could plant."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def plant_pickle(path: Path, marker: Path) -> None:
    """Overwrite the checkpoint file `path` with a pickle that creates `marker` when it is loaded."""
    torch.save({"optimizer_state_dict": RunsAShellCommand(f"touch {marker}")}, path)


ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray Train workers cannot import tests/
