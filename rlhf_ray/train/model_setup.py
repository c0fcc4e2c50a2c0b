"""Build the models the SFT and RM jobs train, and the DeepSpeed config they use."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rlhf_ray.config import Config, LoraConfig, TrainStageConfig
from rlhf_ray.models.loading import torch_dtype


def _apply_lora(model, lora: LoraConfig, task_type: str, modules_to_save: list[str] | None = None):
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    peft_config = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                 target_modules=list(lora.target_modules), task_type=task_type,
                                 modules_to_save=modules_to_save)
    return get_peft_model(model, peft_config)


def build_causal_lm(config: Config, model_path: str | Path):
    """The SFT model: the base causal LM, wrapped with a LoRA adapter when `lora.enabled`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch_dtype(config.model.dtype),
                                                 use_safetensors=True, trust_remote_code=config.model.trust_remote_code)
    if config.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model = _apply_lora(model, config.lora, "CAUSAL_LM") if config.lora.enabled else model
    freeze_below_top_layers(model, config.model.trainable_layers)
    return model


def freeze_below_top_layers(model, trainable_layers: int | None) -> None:
    """Keep gradients only in the top `trainable_layers` decoder layers and what sits above them (final norm,
    heads); the embeddings and lower layers are frozen. A tied LM head is frozen with the embeddings."""
    if trainable_layers is None:
        return
    inner = transformers_model(model)
    backbone = getattr(inner, inner.base_model_prefix, None)
    layers = getattr(backbone, "layers", None)
    if layers is None:
        raise ValueError(f"model.trainable_layers: {type(inner).__name__} has no decoder layer list to freeze below")
    if trainable_layers > len(layers):
        raise ValueError(f"model.trainable_layers {trainable_layers} is more than the model's {len(layers)} layers")
    frozen = [backbone.get_input_embeddings(), *layers[: len(layers) - trainable_layers]]
    for module in frozen:
        for parameter in module.parameters():
            parameter.requires_grad_(False)


def transformers_model(model):
    """The transformers model inside a DeepSpeed engine and a peft wrapper (with any LoRA layers injected)."""
    inner = getattr(model, "module", model)  # DeepSpeedEngine -> the module it wraps
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def backbone_and_head(model):
    """(backbone, LM head) of a causal LM, through a DeepSpeed engine and a peft wrapper; None when the model's
    forward does more than `head(backbone(x))` (final logit soft-capping or scaling) and must be called whole."""
    inner = transformers_model(model)
    config = inner.config
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    backbone, head = getattr(inner, inner.base_model_prefix, None), inner.get_output_embeddings()
    return (backbone, head) if backbone is not None and head is not None else None


def build_reward_model(config: Config, model_path: str | Path, pad_token_id: int):
    """A causal-LM backbone with a scalar head (AutoModelForSequenceClassification, num_labels=1).

    The score is read at the last non-pad token (transformers pools there using pad_token_id;
    our sequences are right-padded and end with the chat template's end-of-turn tokens).
    With LoRA the head is trained in full (`modules_to_save`).
    """
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        str(model_path), num_labels=1, dtype=torch_dtype(config.model.dtype), use_safetensors=True,
        trust_remote_code=config.model.trust_remote_code)
    model.config.pad_token_id = pad_token_id
    if config.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model = _apply_lora(model, config.lora, "SEQ_CLS", modules_to_save=["score"]) if config.lora.enabled else model
    freeze_below_top_layers(model, config.model.trainable_layers)
    return model


def reward_backbone_and_head(model):
    """(backbone, scalar score head) of a sequence-classification reward model, or None if it has no `score`."""
    inner = transformers_model(model)
    backbone, head = getattr(inner, inner.base_model_prefix, None), getattr(inner, "score", None)
    return (backbone, head) if backbone is not None and head is not None else None


def use_bf16(config: Config) -> bool:
    """bf16 where asked, else only on GPUs that support it."""
    if config.deepspeed.bf16 is not None:
        return config.deepspeed.bf16
    return config.resources.use_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def deepspeed_config(config: Config, stage: TrainStageConfig, world_size: int) -> dict:
    """The JSON DeepSpeed gets: the file from `deepspeed.config_file`, with batch sizes, lr and precision filled in."""
    return _filled_deepspeed_config(config, stage.batch_size, stage.grad_accum, world_size, stage.max_grad_norm,
                                    stage.lr, stage.weight_decay)


# The PPO learner's AdamW (torch.optim.AdamW defaults), the same on both learner backends. `fused`: one
# vectorised kernel instead of a loop of per-tensor ops (on SmolLM2-135M's 134.5M fp32 parameters, 2 CPU
# cores: 88-91 against 318-425 ms per step); configs/deepspeed/*.json ask DeepSpeed's torch AdamW for it too.
LEARNER_ADAMW = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01, "fused": True}


def learner_deepspeed_config(config: Config) -> dict:
    """The PPO learner's DeepSpeed JSON (ppo.learner_backend=deepspeed): one process, one optimizer step per PPO
    minibatch, and the torch learner's AdamW settings so that switching backend does not change the algorithm."""
    import math

    ppo = config.ppo
    micro = ppo.micro_batch_size or ppo.minibatch_size
    ds = _filled_deepspeed_config(config, micro, math.ceil(ppo.minibatch_size / micro), 1, ppo.max_grad_norm,
                                  ppo.lr, LEARNER_ADAMW["weight_decay"])
    ds["optimizer"]["params"].update(betas=list(LEARNER_ADAMW["betas"]), eps=LEARNER_ADAMW["eps"],
                                     fused=LEARNER_ADAMW["fused"])
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (1, 2):
        raise ValueError(f"ppo.learner_backend=deepspeed needs ZeRO stage 1 or 2 (it skips steps with non-finite "
                         f"gradients), got stage {stage} from {config.deepspeed.config_file} / deepspeed.zero_stage")
    return ds


def _filled_deepspeed_config(config: Config, micro: int, accum: int, world_size: int, max_grad_norm: float,
                             lr: float, weight_decay: float) -> dict:
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
    ds["bf16"] = {"enabled": use_bf16(config)}
    ds.pop("scheduler", None)  # the warmup/cosine schedule is ours (see warmup_cosine)
    return ds


def warmup_cosine(total_steps: int, warmup_ratio: float):
    """LR multiplier: linear warmup over warmup_ratio * total steps, then cosine decay to 0."""
    import math

    warmup = int(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor
