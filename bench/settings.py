"""Workload sizes of every suite: FULL for real figures (about 100 minutes on 2 cores), QUICK for a smoke run.

The full sizes are small because this machine is small: one fp32 training step of SmolLM2-135M on
8 pairs of ~200 tokens is about 2 TFLOP, some 20 s at the ~100 GFLOP/s two cores give.
"""

from __future__ import annotations

import copy

MODEL = "smollm2-135m-instruct"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]  # rlhf-ray's default LoRA target modules
PRECISION = {"float32": "fp32", "bfloat16": "bf16"}  # short names in suite names and tables
# rlhf-ray's model.precision for a system named ...-fp32 / ...-bf16: bf16 = fp32 weights, bf16 matmuls (autocast)
PRECISION_SETTING = {"fp32": "fp32", "bf16": "bf16-mixed"}


def dtype_of(system: str) -> str:
    """The matmul dtype a system's name says it runs (its MFU peak): bfloat16 for `...-bf16`, else float32."""
    return "bfloat16" if system.endswith("-bf16") else "float32"


FULL: dict[str, dict] = {
    "ceiling": {"dtypes": ["float32", "bfloat16"], "sizes": [512, 1024, 2048], "seconds": 1.0, "windows": 4},
    "rm": {
        "data": "hh-rlhf/helpful-online/test.jsonl.gz",
        "format": "hh-rlhf",
        "limit": 400,
        "max_length": 192,
        "eval_fraction": 0.06,
        "batch_per_worker": 8,
        "workers": 1,
        "cpus_per_worker": 2,
        "zero_stage": 0,
        "chunk_size": 4,
        "steps": 6,
        "lr": 1e-5,
    },
    # the real-data recipe's reward model (one pass over half a of the training split) vs TRL's RewardTrainer
    "rm-quality": {"config": "configs/hh-rlhf.yaml", "steps": 180, "batch": 8, "lr": 1e-4, "extra_overrides": []},
    "sft": {
        "data": "self-instruct/seed_tasks.jsonl",
        "format": "self-instruct",
        "limit": None,
        "max_length": 256,
        "eval_fraction": 0.1,
        "batch_per_worker": 8,
        "workers": 1,
        "cpus_per_worker": 2,
        "zero_stage": 0,
        "chunk_size": 4,
        "steps": 8,
        "lr": 2e-5,
    },
    "ppo": {
        "prompts": "data/demo/prompts.jsonl",
        "max_prompt_length": 64,
        "iterations": 4,
        "rollout_batch": 16,
        "minibatch": 8,
        "epochs": 2,
        "max_new_tokens": 32,
        "lr": 5e-5,
        "kl_coef": 0.05,
        "lora_r": 16,
        "lora_alpha": 32,
        "actor_num_cpus": 0.5,
        "vllm_enforce_eager": False,
    },
    "rollout": {
        "prompts": "hh-rlhf/helpful-online/test.jsonl.gz",
        "max_prompt_length": 64,
        "batches": [16, 64, 256],
        "max_new_tokens": 32,
        "kv_cache_gib": 2,
        "enforce_eager": False,
        "lora_r": 16,
    },
    "scaling": {"batches": [8, 16, 32], "replicas": [1, 2], "replica_batch": 16, "iterations": 4},
    "grpo": {"group": 4},  # the rest as the ppo suite: 16 responses = 4 prompts x 4
}

QUICK_CHANGES: dict[str, dict] = {
    "ceiling": {"sizes": [256, 512, 1024], "seconds": 0.25, "windows": 3},
    "rm": {"limit": 60, "max_length": 160, "eval_fraction": 0.1, "batch_per_worker": 1, "steps": 3},
    "rm-quality": {"steps": 2, "batch": 2, "extra_overrides": ["data.preference.limit=300"]},
    "sft": {"limit": 40, "max_length": 160, "eval_fraction": 0.1, "batch_per_worker": 1, "steps": 3},
    "ppo": {"iterations": 2, "rollout_batch": 4, "minibatch": 2, "epochs": 2, "max_new_tokens": 8},
    "rollout": {"batches": [4, 8], "max_new_tokens": 8, "kv_cache_gib": 1},
    "scaling": {"batches": [4], "replicas": [1, 2], "replica_batch": 4, "iterations": 2},
    "grpo": {"group": 2},
}

DEFAULT_REPEATS = {
    "ceiling": 1,
    "rm": 3,
    "rm-bf16": 3,
    "rm-quality": 1,
    "sft": 3,
    "sft-bf16": 3,
    "ppo": 3,
    "ppo-bf16": 3,
    "grpo": 3,
    "rollout": 3,
    "rollout-bf16": 3,
    "scaling": 1,
}

# Rough seconds per run at FULL size on a quiet 2-core machine, for the progress estimate only.
ESTIMATE_S = {
    "ceiling": 30,
    "prep": 15,
    "rm:rlhf-ray": 170,
    "rm:trl": 140,
    "rm-bf16:rlhf-ray-bf16": 100,
    "rm-bf16:rlhf-ray-fp32": 170,
    "rm-bf16:trl-bf16": 90,
    "rm-quality:rlhf-ray": 900,
    "rm-quality:trl": 1800,
    "sft:rlhf-ray": 130,
    "sft:trl": 100,
    "sft-bf16:rlhf-ray-bf16": 80,
    "sft-bf16:rlhf-ray-fp32": 130,
    "sft-bf16:trl-bf16": 70,
    "ppo:rlhf-ray": 245,
    "ppo:trl-ppo": 220,
    "ppo:trl-rloo": 150,
    "ppo-bf16:rlhf-ray-bf16": 150,
    "ppo-bf16:rlhf-ray-fp32": 245,
    "ppo-bf16:trl-ppo-bf16": 150,
    "grpo:rlhf-ray-grpo": 230,
    "grpo:trl-grpo": 150,
    "grpo:rlhf-ray-gae": 245,
    "rollout:rlhf-ray": 200,
    "rollout:transformers": 110,
    "rollout:rlhf-ray-adapter": 290,
    "rollout-bf16:rlhf-ray": 120,
    "rollout-bf16:transformers": 70,
    "scaling:rlhf-ray": 200,
}


def sizes(suite: str, quick: bool) -> dict:
    values = copy.deepcopy(FULL[suite])
    if quick:
        values.update(copy.deepcopy(QUICK_CHANGES[suite]))
    return values
