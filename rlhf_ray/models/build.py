"""Build the models every stage trains or serves: the causal LM, the reward model, LoRA, layer freezing."""

from __future__ import annotations

from pathlib import Path

from rlhf_ray.config import Config, LoraConfig
from rlhf_ray.models.loading import torch_dtype


def apply_lora(model, lora: LoraConfig, task_type: str, modules_to_save: list[str] | None = None):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type=task_type,
        modules_to_save=modules_to_save,
    )
    return get_peft_model(model, peft_config)


def build_causal_lm(config: Config, model_path: str | Path):
    """The SFT model: the base causal LM, wrapped with a LoRA adapter when `lora.enabled`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(model_path),
        dtype=torch_dtype(config.model.dtype),
        use_safetensors=True,
        trust_remote_code=config.model.trust_remote_code,
    )
    if config.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model = apply_lora(model, config.lora, "CAUSAL_LM") if config.lora.enabled else model
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
        str(model_path),
        num_labels=1,
        dtype=torch_dtype(config.model.dtype),
        use_safetensors=True,
        trust_remote_code=config.model.trust_remote_code,
    )
    model.config.pad_token_id = pad_token_id
    if config.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model = apply_lora(model, config.lora, "SEQ_CLS", modules_to_save=["score"]) if config.lora.enabled else model
    freeze_below_top_layers(model, config.model.trainable_layers)
    return model


def reward_backbone_and_head(model):
    """(backbone, scalar score head) of a sequence-classification reward model, or None if it has no `score`."""
    inner = transformers_model(model)
    backbone, head = getattr(inner, inner.base_model_prefix, None), getattr(inner, "score", None)
    return (backbone, head) if backbone is not None and head is not None else None
