"""The PPO learner's model: the SFT model with a LoRA adapter, and for a critic a value head on its hidden state."""

from __future__ import annotations

import torch

from rlhf_ray.config import LoraConfig
from rlhf_ray.models.build import apply_lora
from rlhf_ray.models.forward import ResponseOutputs, response_forward
from rlhf_ray.models.loading import load_causal_lm
from rlhf_ray.wire import PackedBatch


def checkpoint_name(peft_name: str) -> str:
    """`base_model.model.model.layers.0.q_proj.base_layer.weight` -> `model.layers.0.q_proj.weight`."""
    return peft_name.removeprefix("base_model.model.").replace(".base_layer.", ".")


class LearnerModule(torch.nn.Module):
    """The LoRA policy and its value head (None for critic-free estimators) as one module, so one optimizer
    (or DeepSpeed engine) owns both."""

    def __init__(self, policy, value_head: torch.nn.Linear | None, temperature: float):
        super().__init__()
        self.policy, self.value_head, self.temperature = policy, value_head, temperature

    def forward(self, batch: PackedBatch, entropy: bool = False) -> tuple[ResponseOutputs, torch.Tensor | None]:
        """Response log-probs (and entropy) plus values (None without a value head); `batch` must already be on
        the module's device."""
        critic = self.value_head is not None
        out = response_forward(self.policy, batch, entropy=entropy, hidden=critic, temperature=self.temperature)
        if not critic:
            return out, None
        return out, self.value_head(out.hidden).squeeze(-1).float() * batch.response_mask


def build_learner_module(
    model_path: str,
    lora: LoraConfig,
    temperature: float,
    *,
    value_head: bool,
    dtype: str,
    trust_remote_code: bool,
    device: torch.device,
) -> LearnerModule:
    """The base model with a fresh LoRA adapter and, if asked, a value head initialised small (seed torch first)."""
    base = load_causal_lm(model_path, dtype, trust_remote_code).to(device)
    policy = apply_lora(base, lora, "CAUSAL_LM")
    head = None
    if value_head:
        head = torch.nn.Linear(base.config.hidden_size, 1, dtype=base.dtype, device=device)
        torch.nn.init.normal_(head.weight, std=1.0 / (base.config.hidden_size + 1))
        torch.nn.init.zeros_(head.bias)
    return LearnerModule(policy, head, temperature)


def has_dropout(model: torch.nn.Module) -> bool:
    """True when a forward in training mode is random (so two forwards over the same rows differ)."""
    if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()):
        return True
    config = getattr(model, "config", None)
    return any(getattr(config, name, 0) or 0 for name in ("attention_dropout", "hidden_dropout", "dropout"))


@torch.no_grad()
def merged_lora_weights(model) -> dict[str, torch.Tensor]:
    """The LoRA-adapted modules' weights with the update folded in (W + scale * B @ A), on the CPU, by
    checkpoint name: every tensor of a module that holds an adapted layer, since vLLM reloads fused layers whole."""
    from peft.tuners.lora import LoraLayer

    deltas, parents = {}, set()
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            deltas[checkpoint_name(name) + ".weight"] = sum(
                module.get_delta_weight(adapter) for adapter in module.active_adapters
            )
            parents.add(checkpoint_name(name).rpartition(".")[0] + ".")
    tensors = {}
    for name, param in model.named_parameters():
        name = checkpoint_name(name)
        if "lora_" not in name and name.startswith(tuple(parents)):
            merged = param + deltas[name] if name in deltas else param
            tensors[name] = merged.detach().to("cpu", copy=True).contiguous()
    return tensors
