"""Optimizer settings shared by every training stage: the DeepSpeed JSON, the PPO learner's AdamW, the LR schedule."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from rlhf_ray.config import Config, TrainStageConfig


def bf16_setting(config: Config, on_gpu: bool) -> bool | str:
    """DeepSpeed's bf16 for an engine on a GPU (`on_gpu`) or the CPU: deepspeed.bf16 where set; else off on the
    CPU (model.precision autocasts there) and, on a GPU, as model.precision says: "auto" is settled by the
    process that holds the GPU (`settle_bf16`), since the driver may run on a node without one."""
    if config.deepspeed.bf16 is not None:
        return config.deepspeed.bf16
    if not on_gpu or config.model.precision == "fp32":
        return False
    return True if config.model.precision == "bf16-mixed" else "auto"


def settle_bf16(ds_config: dict) -> dict:
    """The DeepSpeed JSON with bf16 "auto" settled on this process's device: on where its GPU supports bf16."""
    if ds_config.get("bf16", {}).get("enabled") != "auto":
        return ds_config
    enabled = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return {**ds_config, "bf16": {**ds_config["bf16"], "enabled": enabled}}


def deepspeed_config(config: Config, stage: TrainStageConfig, world_size: int) -> dict:
    """The JSON DeepSpeed gets: the file from `deepspeed.config_file`, with batch sizes, lr and precision filled in."""
    ds = _filled_deepspeed_config(
        config, stage.batch_size, stage.grad_accum, world_size, stage.max_grad_norm, stage.lr, stage.weight_decay
    )
    ds["bf16"] = {"enabled": bf16_setting(config, config.resources.use_gpu)}
    return ds


# The PPO learner's AdamW (torch.optim.AdamW defaults), the same on both learner backends. `fused`: one
# vectorised kernel instead of a loop of per-tensor ops (on SmolLM2-135M's 134.5M fp32 parameters, 2 CPU
# cores: 88-91 against 318-425 ms per step); configs/deepspeed/*.json ask DeepSpeed's torch AdamW for it too.
LEARNER_ADAMW = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01, "fused": True}


def learner_deepspeed_config(config: Config) -> dict:
    """The PPO learner's DeepSpeed JSON (ppo.learner_backend=deepspeed): one process, one optimizer step per PPO
    minibatch, and the torch learner's AdamW settings so that switching backend does not change the algorithm."""
    ppo = config.ppo
    micro = ppo.micro_batch_size or ppo.minibatch_size
    ds = _filled_deepspeed_config(
        config,
        micro,
        math.ceil(ppo.minibatch_size / micro),
        1,
        ppo.max_grad_norm,
        ppo.lr,
        LEARNER_ADAMW["weight_decay"],
    )
    ds["optimizer"]["params"].update(
        betas=list(LEARNER_ADAMW["betas"]), eps=LEARNER_ADAMW["eps"], fused=LEARNER_ADAMW["fused"]
    )
    ds["bf16"] = {"enabled": bf16_setting(config, config.resources.learner_num_gpus > 0)}
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (1, 2):
        raise ValueError(
            f"ppo.learner_backend=deepspeed needs ZeRO stage 1 or 2 (it skips steps with non-finite "
            f"gradients), got stage {stage} from {config.deepspeed.config_file} / deepspeed.zero_stage"
        )
    return ds


def _filled_deepspeed_config(
    config: Config, micro: int, accum: int, world_size: int, max_grad_norm: float, lr: float, weight_decay: float
) -> dict:
    path = Path(config.deepspeed.config_file)
    try:
        ds = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise FileNotFoundError(f"DeepSpeed config not found: {path} (deepspeed.config_file)") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: not valid JSON: {err.msg}") from err
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = accum
    ds["train_batch_size"] = micro * accum * world_size
    ds["gradient_clipping"] = max_grad_norm
    ds.setdefault("optimizer", {"type": "AdamW", "params": {"torch_adam": True}})
    ds["optimizer"].setdefault("params", {}).update(lr=lr, weight_decay=weight_decay)
    if config.deepspeed.zero_stage is not None:
        ds.setdefault("zero_optimization", {})["stage"] = config.deepspeed.zero_stage
    ds.pop("scheduler", None)  # the warmup/cosine schedule is ours (see warmup_cosine)
    return ds


def warmup_cosine(total_steps: int, warmup_ratio: float):
    """LR multiplier: linear warmup over warmup_ratio * total steps, then cosine decay to 0."""
    warmup = int(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor
