"""What differs between the SFT and RM jobs: the model, the batch, the loss, eval metrics and export.

Each task works on sums (not means) so data-parallel workers can all-reduce them exactly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Protocol

import torch

from rlhf_ray.algo.losses import (
    next_token_loss,
    pairwise_reward_loss,
    response_token_loss,
)
from rlhf_ray.config import Config
from rlhf_ray.train import batches
from rlhf_ray.train.model_setup import (
    backbone_and_head,
    build_causal_lm,
    build_reward_model,
)


class Task(Protocol):
    name: str

    def build_model(self, config: Config, model_path: str, pad_id: int) -> torch.nn.Module: ...

    def collate(self, rows: list[dict], pad_id: int, chunk_size: int) -> list[dict[str, torch.Tensor]]: ...

    def loss_and_sums(self, model, chunks: list[dict], config: Config) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def train_metrics(self, sums: dict[str, float]) -> dict[str, float]: ...

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]: ...

    def export_extras(self, folder: Path, eval_sums: dict[str, float]) -> None: ...


class SFTTask:
    name = "sft"

    def build_model(self, config, model_path, pad_id):
        return build_causal_lm(config, model_path)

    def collate(self, rows, pad_id, chunk_size):
        return batches.collate_sft_chunks(rows, pad_id, chunk_size)

    def loss_and_sums(self, model, chunks, config):
        """One micro-batch's mean token loss over all its chunks (the same value one padded pass gives)."""
        total, count, seq_tokens = 0.0, 0, 0
        parts = backbone_and_head(model)
        for batch in chunks:
            if parts:
                hidden = parts[0](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
                chunk_total, chunk_count = response_token_loss(hidden, batch["labels"], parts[1])
            else:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                chunk_total, chunk_count = next_token_loss(logits, batch["labels"])
            total, count = total + chunk_total, count + chunk_count
            seq_tokens += batch["attention_mask"].sum()
        count = torch.as_tensor(count)
        sums = {"loss_sum": total.detach(), "tokens": count.float(), "seq_tokens": seq_tokens.float()}
        return total / count.clamp(min=1), sums

    def train_metrics(self, sums):
        return {"loss": sums["loss_sum"] / max(sums["tokens"], 1.0), "tokens": sums["tokens"]}

    def eval_metrics(self, sums):
        loss = sums["loss_sum"] / max(sums["tokens"], 1.0)
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}

    def export_extras(self, folder, eval_sums):
        pass


class RMTask:
    name = "rm"

    def build_model(self, config, model_path, pad_id):
        return build_reward_model(config, model_path, pad_id)

    def collate(self, rows, pad_id, chunk_size):
        return batches.collate_pair_chunks(rows, pad_id, chunk_size)

    def loss_and_sums(self, model, chunks, config):
        chosen_parts, rejected_parts = [], []
        for batch in chunks:
            scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1).float()
            chosen_part, rejected_part = scores.chunk(2)  # collate_pairs puts chosen first
            chosen_parts.append(chosen_part)
            rejected_parts.append(rejected_part)
        chosen, rejected = torch.cat(chosen_parts), torch.cat(rejected_parts)
        rewards = torch.cat([chosen, rejected])
        loss = pairwise_reward_loss(chosen, rejected, config.rm.margin)
        sums = {"loss_sum": loss.detach() * chosen.numel(), "pairs": torch.tensor(float(chosen.numel())),
                "correct": (chosen > rejected).float().sum().detach(), "margin_sum": (chosen - rejected).sum().detach(),
                "reward_sum": rewards.sum().detach(), "reward_sq_sum": (rewards ** 2).sum().detach(),
                "seq_tokens": sum(batch["attention_mask"].sum() for batch in chunks).float()}
        return loss, sums

    def train_metrics(self, sums):
        pairs = max(sums["pairs"], 1.0)
        return {"loss": sums["loss_sum"] / pairs, "accuracy": sums["correct"] / pairs}

    def eval_metrics(self, sums):
        pairs = max(sums["pairs"], 1.0)
        mean, var = reward_moments(sums)
        return {"eval_loss": sums["loss_sum"] / pairs, "eval_accuracy": sums["correct"] / pairs,
                "eval_margin": sums["margin_sum"] / pairs, "eval_reward_mean": mean, "eval_reward_std": math.sqrt(var)}

    def export_extras(self, folder, eval_sums):
        """reward_stats.json: mean/std of held-out rewards, which PPO uses to normalise scores."""
        mean, var = reward_moments(eval_sums)
        stats = {"mean": mean, "std": math.sqrt(var), "count": int(2 * eval_sums["pairs"])}
        (folder / "reward_stats.json").write_text(json.dumps(stats, indent=2) + "\n")


def reward_moments(sums: dict[str, float]) -> tuple[float, float]:
    n = max(2 * sums["pairs"], 1.0)
    mean = sums["reward_sum"] / n
    return mean, max(sums["reward_sq_sum"] / n - mean * mean, 0.0)


TASKS: dict[str, Task] = {"sft": SFTTask(), "rm": RMTask()}
