"""The PPO learner's two optimizer backends behind one interface (`ppo.learner_backend`).

Both run the same algorithm: AdamW with LEARNER_ADAMW's settings, gradient clipping at
`ppo.max_grad_norm`, and a minibatch whose loss or gradient norm is not finite leaves the weights and
the optimizer state unchanged.
- `TorchAdamW`: plain torch (the CPU default; with one learner process ZeRO has nothing to shard).
- `DeepSpeedEngine`: a one-process DeepSpeed engine (ZeRO stage 1/2, bf16 where the GPU has it),
  which clips, steps at the minibatch boundary and skips non-finite steps by itself.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch

from rlhf_ray.models.optim import LEARNER_ADAMW, settle_bf16
from rlhf_ray.models.safe_load import load_deepspeed_checkpoint


class LearnerBackend(Protocol):
    forward: Callable  # what forwards run through: the policy module, or the engine wrapping it
    casts_to_bf16: bool  # the backend casts the model to bf16 itself (no autocast on top)

    def zero_grad(self) -> None: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self, stats: dict[str, float]) -> bool:
        """Apply the minibatch's accumulated gradients unless a statistic or the gradient norm is not finite.
        Records `grad_norm` (before clipping) in `stats`; False when the step was skipped."""
        ...

    def save(self, folder: Path) -> dict:
        """Write what lives outside the returned state (which goes into the learner's own state file)."""
        ...

    def load(self, folder: Path, state: dict) -> None: ...


def all_finite(stats: dict[str, float]) -> bool:
    return all(math.isfinite(value) for value in stats.values())


class TorchAdamW:
    casts_to_bf16 = False

    def __init__(self, module: torch.nn.Module, parameters: list[torch.nn.Parameter], lr: float, max_grad_norm: float):
        self.forward, self.parameters, self.max_grad_norm = module, parameters, max_grad_norm
        self.optimizer = torch.optim.AdamW(parameters, lr=lr, **LEARNER_ADAMW)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, stats: dict[str, float]) -> bool:
        stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.parameters, self.max_grad_norm))
        if not all_finite(stats):
            self.zero_grad()
            return False
        self.optimizer.step()
        return True

    def save(self, folder: Path) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def load(self, folder: Path, state: dict) -> None:
        if "optimizer" not in state:
            raise ValueError(f"{folder} was written by the deepspeed learner backend; it has no torch optimizer state")
        self.optimizer.load_state_dict(state["optimizer"])


class DeepSpeedEngine:
    def __init__(self, module: torch.nn.Module, parameters: list[torch.nn.Parameter], ds_config: dict):
        self.engine = self.forward = start_deepspeed(module, parameters, ds_config)
        self.casts_to_bf16 = self.engine.bfloat16_enabled()

    def zero_grad(self) -> None:
        """Nothing: the engine zeroes the gradients when it steps."""

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()  # applies the update only at the minibatch's last micro-batch

    def step(self, stats: dict[str, float]) -> bool:
        """The micro-batches already stepped the engine (a NaN loss made it skip); read what happened."""
        norm = self.engine.get_global_grad_norm()
        stats["grad_norm"] = float(norm) if norm is not None else math.nan
        return self.engine.was_step_applied()

    def save(self, folder: Path) -> dict:
        """Optimizer state in DeepSpeed's own layout; the frozen base weights are not copied."""
        self.engine.save_checkpoint(
            str(folder / "deepspeed"), tag="learner", save_latest=False, exclude_frozen_parameters=True
        )
        return {}

    def load(self, folder: Path, state: dict) -> None:
        if not (folder / "deepspeed").is_dir():
            raise ValueError(f"{folder} was written by the torch learner backend; it has no DeepSpeed state")
        load_deepspeed_checkpoint(self.engine, folder / "deepspeed", tag="learner", load_module_strict=False)


def start_deepspeed(module: torch.nn.Module, parameters: list, ds_config: dict):
    """A one-process DeepSpeed engine inside this actor (gloo on CPU, nccl on a GPU)."""
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        with socket.socket() as probe:  # a free local port for the one-member process group
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        # A process group destroyed by another library in this process (vLLM's engine shutdown does so)
        # leaves DeepSpeed's cached groups pointing at it; a new world starts with none.
        release = getattr(deepspeed.utils.groups, "_release_process_group_references", None)
        if release is not None:
            release()
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    engine, *_ = deepspeed.initialize(model=module, model_parameters=parameters, config=settle_bf16(ds_config))
    return engine


def make_backend(
    module: torch.nn.Module,
    parameters: list[torch.nn.Parameter],
    lr: float,
    max_grad_norm: float,
    deepspeed_config: dict | None,
) -> LearnerBackend:
    """DeepSpeed when given its JSON (ppo.learner_backend=deepspeed), else torch AdamW."""
    if deepspeed_config:
        return DeepSpeedEngine(module, parameters, deepspeed_config)
    return TorchAdamW(module, parameters, lr, max_grad_norm)
