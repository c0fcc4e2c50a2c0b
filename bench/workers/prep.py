"""Shared inputs of an A/B pair, made once with rlhf-ray's own data code so both sides see the same tokens.

- kind "rm" / "sft": the train and held-out rows exactly as `run_stage` will split them, and the
  training rows in the order rlhf-ray's workers consume them (global batch by global batch),
  so TRL (sequential sampler) trains on the same pairs / examples step for step.
- kind "prompts": chat-templated prompt token ids (and the chat messages, for TRL trainers that
  template themselves); optionally the bench reward model.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench.workers._io import main
from bench.workers.train_rlhf import row_tokens


def training_order(n_train: int, batch_size: int, workers: int, steps: int, seed: int) -> list[int]:
    """Row indices in the order rlhf-ray's data-parallel workers consume them over `steps` steps (grad_accum 1)."""
    from rlhf_ray.train.batches import epoch_batches

    order, epoch = [], 0
    while len(order) < steps * batch_size * workers:
        per_rank = [epoch_batches(n_train, batch_size, rank, workers, seed, epoch) for rank in range(workers)]
        for step in range(len(per_rank[0])):
            order.extend(i for rank in range(workers) for i in per_rank[rank][step])
        epoch += 1
    return order[: steps * batch_size * workers]


def prepare_training(spec: dict) -> dict:
    from rlhf_ray.config import load_config
    from rlhf_ray.models.loading import load_tokenizer
    from rlhf_ray.train.launch import prepare_rows, stage_model_paths

    config = load_config(spec["config"], spec["overrides"])
    stage = spec["kind"]
    model_path, tokenizer_path = stage_model_paths(config)
    tokenizer = load_tokenizer(tokenizer_path)
    train, held_out, summary = prepare_rows(config, stage, tokenizer)
    stage_config = getattr(config, stage)
    order = training_order(
        len(train), stage_config.batch_size, config.resources.num_workers, stage_config.max_steps, config.data.seed
    )
    data = {"train_in_order": [train[i] for i in order], "eval": held_out, "pad_id": tokenizer.pad_token_id}
    Path(spec["data_out"]).write_text(json.dumps(data))
    tokens = [row_tokens(r) for r in data["train_in_order"]]
    out = {
        "summary": summary,
        "model_path": str(model_path),
        "n_train": len(train),
        "n_eval": len(held_out),
        "mean_tokens_per_row": sum(tokens) / max(len(tokens), 1),
    }
    if stage == "rm":  # the share of real tokens rm.shared_prompt computes over the steps run
        from rlhf_ray.train.batches import packed_pair_length

        out["computed_share"] = sum(map(packed_pair_length, data["train_in_order"])) / max(sum(tokens), 1)
    return out


def build_reward_model(model_path: str, folder: Path, seed: int = 0) -> None:
    """SmolLM2 with a fresh scalar head (AutoModelForSequenceClassification, num_labels=1) and neutral stats."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from rlhf_ray.models.loading import load_tokenizer

    if (folder / "reward_stats.json").is_file():
        return
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1, use_safetensors=True)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "reward_stats.json").write_text(json.dumps({"mean": 0.0, "std": 1.0, "count": 0}))


def prepare_prompts(spec: dict) -> dict:
    from rlhf_ray.config import load_config
    from rlhf_ray.models.loading import load_tokenizer
    from rlhf_ray.models.provision import resolve_model
    from rlhf_ray.ppo.prompts import load_prompt_set

    config = load_config(spec["config"], spec["overrides"])
    model_path = str(resolve_model(config.model.name_or_path))
    tokenizer = load_tokenizer(model_path)
    prompts = load_prompt_set(config, tokenizer)
    data = {
        "token_ids": prompts.token_ids,
        "messages": [list(map(dict, e.prompt)) for e in prompts.examples],
        "eos_token_id": tokenizer.eos_token_id,
        "pad_id": tokenizer.pad_token_id,
    }
    Path(spec["data_out"]).write_text(json.dumps(data))
    if spec.get("reward_model_out"):
        build_reward_model(model_path, Path(spec["reward_model_out"]))
    lengths = [len(ids) for ids in prompts.token_ids]
    return {
        "summary": prompts.summary,
        "model_path": model_path,
        "n_prompts": len(lengths),
        "mean_prompt_tokens": sum(lengths) / len(lengths),
    }


def run(spec: dict) -> dict:
    return prepare_prompts(spec) if spec["kind"] == "prompts" else prepare_training(spec)


if __name__ == "__main__":
    main(run)
