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
from rlhf_ray.models.build import (
    backbone_and_head,
    build_causal_lm,
    build_reward_model,
    reward_backbone_and_head,
    transformers_model,
)
from rlhf_ray.train import batches


class Task(Protocol):
    name: str

    def build_model(self, config: Config, model_path: str, pad_id: int) -> torch.nn.Module: ...

    def collate(
        self, rows: list[dict], pad_id: int, chunk_size: int, config: Config
    ) -> list[dict[str, torch.Tensor]]: ...

    def loss_and_sums(
        self, model, chunks: list[dict], config: Config
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def train_metrics(self, sums: dict[str, float]) -> dict[str, float]: ...

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]: ...

    def export_extras(self, folder: Path, eval_sums: dict[str, float]) -> None: ...


class SFTTask:
    name = "sft"

    def build_model(self, config, model_path, pad_id):
        model = build_causal_lm(config, model_path)
        problem = packing_problem(model, pad_id, config.data.max_length) if config.sft.packing else None
        if problem:
            raise ValueError(f"sft.packing: {problem}. Set sft.packing=false to run each sequence in a row of its own.")
        return model

    def collate(self, rows, pad_id, chunk_size, config):
        if config.sft.packing:
            return [batches.collate_packed_sft(rows, pad_id)]
        return batches.collate_sft_chunks(rows, pad_id, chunk_size)

    def loss_and_sums(self, model, chunks, config):
        """One micro-batch's mean token loss over all its chunks (the same value one padded pass gives)."""
        total, count, seq_tokens = 0.0, 0, 0
        parts = backbone_and_head(model)
        for batch in chunks:
            if parts:
                hidden = parts[0](**model_inputs(batch, parts[0])).last_hidden_state
                chunk_total, chunk_count = response_token_loss(hidden, batch["labels"], parts[1])
            else:
                chunk_total, chunk_count = next_token_loss(model(**model_inputs(batch, model)).logits, batch["labels"])
            total, count = total + chunk_total, count + chunk_count
            seq_tokens += sequence_tokens(batch)
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
        model = build_reward_model(config, model_path, pad_id)
        problem = shared_prompt_problem(model, pad_id, config.data.max_length) if config.rm.shared_prompt else None
        if problem:
            raise ValueError(
                f"rm.shared_prompt: {problem}. Set rm.shared_prompt=false to score each sequence in a pass of its own."
            )
        return model

    def collate(self, rows, pad_id, chunk_size, config):
        if config.rm.shared_prompt:
            return batches.shared_prompt_pair_chunks(rows, pad_id, chunk_size)
        return batches.collate_pair_chunks(rows, pad_id, chunk_size)

    def loss_and_sums(self, model, chunks, config):
        chosen_parts, rejected_parts = [], []
        for batch in chunks:
            chosen_part, rejected_part = pair_scores(model, batch)
            chosen_parts.append(chosen_part)
            rejected_parts.append(rejected_part)
        chosen, rejected = torch.cat(chosen_parts), torch.cat(rejected_parts)
        rewards = torch.cat([chosen, rejected])
        loss = pairwise_reward_loss(chosen, rejected, config.rm.margin)
        sums = {
            "loss_sum": loss.detach() * chosen.numel(),
            "pairs": torch.tensor(float(chosen.numel())),
            "correct": (chosen > rejected).float().sum().detach(),
            "margin_sum": (chosen - rejected).sum().detach(),
            "reward_sum": rewards.sum().detach(),
            "reward_sq_sum": (rewards**2).sum().detach(),
            "seq_tokens": sum(sequence_tokens(batch) for batch in chunks).float(),
        }
        return loss, sums

    def train_metrics(self, sums):
        pairs = max(sums["pairs"], 1.0)
        return {"loss": sums["loss_sum"] / pairs, "accuracy": sums["correct"] / pairs}

    def eval_metrics(self, sums):
        pairs = max(sums["pairs"], 1.0)
        mean, var = reward_moments(sums)
        return {
            "eval_loss": sums["loss_sum"] / pairs,
            "eval_accuracy": sums["correct"] / pairs,
            "eval_margin": sums["margin_sum"] / pairs,
            "eval_reward_mean": mean,
            "eval_reward_std": math.sqrt(var),
        }

    def export_extras(self, folder, eval_sums):
        """reward_stats.json: mean/std of held-out rewards, which PPO uses to normalise scores."""
        mean, var = reward_moments(eval_sums)
        stats = {"mean": mean, "std": math.sqrt(var), "count": int(2 * eval_sums["pairs"])}
        (folder / "reward_stats.json").write_text(json.dumps(stats, indent=2) + "\n")


def sequence_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The real tokens of the sequences a chunk stands for (however it lays them out)."""
    return batch["sequence_tokens"] if "sequence_tokens" in batch else batch["attention_mask"].sum()


def pair_scores(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 scores of a chunk's chosen and rejected sequences, from either collated layout."""
    if "chosen_at" not in batch:  # collate_pairs: chosen sequences, then rejected ones, each pooled by transformers
        scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1).float()
        return scores.chunk(2)
    backbone, head = reward_backbone_and_head(model)
    return head(shared_prompt_hidden(backbone, batch)).squeeze(-1).float().chunk(2)


def model_inputs(batch: dict[str, torch.Tensor], model) -> dict:
    """Forward arguments of a padded chunk, or of a packed one (a (B, 1, T, T) boolean attention mask,
    passed in the additive form that both sdpa and eager attention take, and position ids)."""
    if "position_ids" not in batch:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    dtype = transformers_model(model).get_input_embeddings().weight.dtype
    allowed = batch["attention_mask"]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
    return {
        "input_ids": batch["input_ids"],
        "attention_mask": mask,
        "position_ids": batch["position_ids"],
        "use_cache": False,
    }


def shared_prompt_hidden(backbone, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(2B, hidden): the backbone's last hidden states at the scored tokens of a collate_shared_prompt_pairs
    chunk, chosen rows first."""
    hidden = backbone(**model_inputs(batch, backbone)).last_hidden_state
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return torch.cat([hidden[rows, batch["chosen_at"]], hidden[rows, batch["rejected_at"]]])


def made_up_tokens(model, pad_id: int, count: int) -> list[int]:
    """`count` distinct token ids other than `pad_id`, the same every time."""
    vocab = transformers_model(model).config.vocab_size
    return [t for t in torch.randperm(vocab, generator=torch.Generator().manual_seed(0)).tolist() if t != pad_id][
        :count
    ]


def sliding_window_problem(model, span: int) -> str | None:
    config = transformers_model(model).config
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and window < span:
        return (
            f"the model's sliding-window attention ({window} tokens) is shorter than a packed row may be "
            f"({span} tokens)"
        )
    return None


def layout_problem(model, packed_run, separate_run) -> str | None:
    """Why a packed layout's outputs (`packed_run()`) differ from separate passes' (`separate_run()`), or None.

    Checked at start-up on made-up tokens: an architecture that ignores position ids or custom attention
    masks (or an attention kernel that refuses them) shows up here instead of as a quietly wrong model.
    """
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed, alone = packed_run().float(), separate_run().float()
    except Exception as err:  # noqa: BLE001 - any failure means this model cannot take the packed layout
        return f"the packed forward failed ({type(err).__name__}: {err})"
    finally:
        model.train(training)
    error = float((packed - alone).norm() / alone.norm())
    tolerance = 1e-3 if transformers_model(model).dtype == torch.float32 else 5e-2
    if error > tolerance:
        return (
            f"outputs of a test layout differ by {error:.2g} (relative) from separate passes; the "
            "architecture does not honour position ids or a custom attention mask"
        )
    return None


def shared_prompt_problem(model, pad_id: int, max_length: int) -> str | None:
    """Why `model` cannot score a pair in one shared-prompt pass, or None (see layout_problem)."""
    parts = reward_backbone_and_head(model)
    if parts is None:
        return f"{type(transformers_model(model)).__name__} has no `score` head on a backbone"
    backbone = parts[0]
    tokens = made_up_tokens(model, pad_id, 52)
    row = {"chosen_ids": tokens[:40], "rejected_ids": tokens[:24] + tokens[40:]}  # a 24-token shared prompt
    separate = batches.collate_pairs([row], pad_id)

    def alone():
        hidden = backbone(
            input_ids=separate["input_ids"], attention_mask=separate["attention_mask"], use_cache=False
        ).last_hidden_state
        return hidden[torch.arange(2), torch.tensor([39, 35])]

    return sliding_window_problem(model, 2 * max_length) or layout_problem(
        model, lambda: shared_prompt_hidden(backbone, batches.collate_shared_prompt_pairs([row], pad_id)), alone
    )


def packing_problem(model, pad_id: int, max_length: int) -> str | None:
    """Why `model` cannot run packed SFT rows (batches.collate_packed_sft), or None (see layout_problem)."""
    tokens = made_up_tokens(model, pad_id, 48)
    rows = [{"input_ids": part, "labels": part} for part in (tokens[:24], tokens[24:38], tokens[38:])]
    packed = batches.collate_packed_sft(rows, pad_id)  # [first], [second, third]
    separate = batches.collate_sft(rows, pad_id)

    def alone():
        logits = model(
            input_ids=separate["input_ids"], attention_mask=separate["attention_mask"], use_cache=False
        ).logits
        return torch.cat([logits[0, :24], logits[1, :14], logits[2, :10]])

    return sliding_window_problem(model, max_length) or layout_problem(
        model, lambda: model(**model_inputs(packed, model)).logits.flatten(0, 1), alone
    )


def reward_moments(sums: dict[str, float]) -> tuple[float, float]:
    n = max(2 * sums["pairs"], 1.0)
    mean = sums["reward_sum"] / n
    return mean, max(sums["reward_sq_sum"] / n - mean * mean, 0.0)


TASKS: dict[str, Task] = {"sft": SFTTask(), "rm": RMTask()}
