"""Model FLOPs, counted the usual way, and MFU (achieved FLOP/s over the measured matmul peak).

- N counts the parameters that take part in matrix multiplies: every linear layer of the
  decoder blocks, plus the output projection: the LM head (vocab x hidden, tied to the
  embedding in SmolLM2) for a causal LM, the 1-output score head for a reward/value model.
  Embedding lookups, norms, rotary embeddings and attention's QK^T / AV products
  (2 x layers x context x hidden per token) are not counted.
- Tokens are real tokens (attention mask), never padding.
- Full training: 6 N per token (forward 2N, backward 4N).
- LoRA training: 4 N per token. The frozen base still runs forward (2N) and propagates
  activation gradients (2N), but computes no weight gradients (the other 2N); adapter
  FLOPs are negligible at rank 16. (Some papers count 6N even with LoRA; that would
  raise every LoRA MFU figure here by half.)
- Forward only (scoring, reference log-probs, old log-probs/values): 2 N per token.
- Generation: 2 N per generated token (prompt prefill is not counted).
"""

from __future__ import annotations

import json
from pathlib import Path


def matmul_params(config: dict, head: str) -> int:
    """N for a Llama-style config.json; head is "lm" (vocab output) or "score" (one scalar)."""
    hidden, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv = config.get("num_key_value_heads", heads) * head_dim
    per_layer = hidden * heads * head_dim * 2 + hidden * kv * 2 + 3 * hidden * inter  # q,o + k,v + gate,up,down
    out = config["vocab_size"] * hidden if head == "lm" else hidden
    return layers * per_layer + out


def model_params(model_dir: str | Path) -> dict[str, int]:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return {"lm": matmul_params(config, "lm"), "score": matmul_params(config, "score")}


def train_flops(params: int, tokens: float, lora: bool = False) -> float:
    return (4.0 if lora else 6.0) * params * tokens


def forward_flops(params: int, tokens: float) -> float:
    return 2.0 * params * tokens


def generation_flops(params: int, generated_tokens: float) -> float:
    return 2.0 * params * generated_tokens


def mfu(flops_per_s: float | None, peak_flops_per_s: float | None) -> float | None:
    if not flops_per_s or not peak_flops_per_s:
        return None
    return flops_per_s / peak_flops_per_s


def ppo_iteration_flops(
    params: dict[str, int],
    prompt_tokens: float,
    response_tokens: float,
    epochs: int,
    full_value_model: bool = False,
    value_forward: bool = True,
) -> float:
    """FLOPs of one PPO-style iteration over a batch with these many real prompt and response tokens.

    generate; reward model forward; reference forward; old log-probs (+values) forward; `epochs`
    LoRA passes of the policy. With `full_value_model` (TRL's PPOTrainer) a separate full value
    model also runs forward once and trains in full each epoch.
    """
    lm, score, seq = params["lm"], params["score"], prompt_tokens + response_tokens
    total = generation_flops(lm, response_tokens) + forward_flops(score, seq) + forward_flops(lm, seq)
    if value_forward:
        total += forward_flops(lm, seq)
    total += epochs * train_flops(lm, seq, lora=True)
    if full_value_model:
        total += forward_flops(score, seq) + epochs * train_flops(score, seq)
    return total
