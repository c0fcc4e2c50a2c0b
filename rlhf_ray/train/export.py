"""Export the trained model in Hugging Face format (plus a PEFT adapter folder with LoRA)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from rlhf_ray.models.export import mark_exported
from rlhf_ray.models.loading import load_tokenizer


def gather_state_dict(engine, rank: int):
    """The full (unpartitioned) state dict on rank 0; every rank must call this under ZeRO-3."""
    if engine.zero_optimization_stage() == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    return engine.module.state_dict() if rank == 0 else None


def nonfinite_tensors(state: dict) -> list[str]:
    """Names of the floating-point tensors in `state` that hold a NaN or inf."""
    return [
        name for name, tensor in state.items() if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]


def export_model(engine, task, config, loop_config: dict, rank: int, eval_sums: dict) -> str | None:
    """Rank 0 rebuilds the model, loads the trained weights and writes `<output_dir>/model` atomically.

    With LoRA, `<output_dir>/adapter` holds the PEFT adapter and `model` the merged weights,
    so both plain transformers and peft load the result. Weights holding NaN/inf are not exported:
    the reason is returned instead (None when exported, and on the other ranks).
    """
    state = gather_state_dict(engine, rank)
    if rank != 0:
        return None
    bad = nonfinite_tensors(state)
    if bad:
        return (
            f"{task.name}: {len(bad)} of {len(state)} weight tensors hold NaN/inf (first: {bad[0]}); "
            "the model was not exported"
        )

    out = Path(loop_config["output_dir"])
    staging = out / ".export-tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    fresh = task.build_model(config, loop_config["model_path"], loop_config["pad_id"])
    fresh.load_state_dict(state)
    if config.lora.enabled:
        fresh.save_pretrained(staging / "adapter", safe_serialization=True)
        fresh = fresh.merge_and_unload()
    fresh.save_pretrained(staging / "model", safe_serialization=True)
    load_tokenizer(loop_config["tokenizer_path"], config.model.trust_remote_code).save_pretrained(staging / "model")
    task.export_extras(staging / "model", eval_sums)
    for name in ("model", "adapter"):
        target = out / name
        if (staging / name).exists():
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging / name, target)
    shutil.rmtree(staging, ignore_errors=True)
    summary = {"stage": task.name, "lora": config.lora.enabled, "base_model": str(loop_config["model_path"])}
    mark_exported(out / "model", summary)
    print(f"[{task.name}] exported {out / 'model'}", flush=True)
    return None
