"""PolicyLearner: the SFT model with a LoRA adapter (and a value head for GAE); PPO-style clipped updates.

The optimizer is one of two backends with the same algorithm (models/learner_backend.py): plain
torch AdamW (`ppo.learner_backend: torch`) or a one-process DeepSpeed engine (`deepspeed`).
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_ray.algo.aggregation import LossAggregation
from rlhf_ray.algo.losses import masked_mean
from rlhf_ray.algo.ppo import kl_loss, policy_loss, value_loss
from rlhf_ray.config import LoraConfig, PPOConfig
from rlhf_ray.models.forward import ResponseOutputs
from rlhf_ray.models.learner_backend import all_finite, make_backend
from rlhf_ray.models.loading import default_device, load_tokenizer
from rlhf_ray.models.policy import build_learner_module, has_dropout, merged_lora_weights
from rlhf_ray.models.precision import Precision, autocast, resolve_precision
from rlhf_ray.models.safe_load import weights_only_load
from rlhf_ray.wire import AdapterPayload, Experience, MergedWeights, PackedBatch, UpdateStats


@dataclass
class HeldForward:
    """The coming update's first micro-batch, run by `logprobs_and_values` with its autograd graph kept.

    The update's first forward sees the same weights and rows, so it would compute exactly this again.
    """

    batch: PackedBatch  # the whole batch the old log-probs were computed for (on the learner's device)
    version: int  # the policy version it was run with
    rows: torch.Tensor  # the micro-batch's rows in `batch`
    outputs: ResponseOutputs
    values: torch.Tensor | None

    def matches(self, batch: PackedBatch, version: int) -> bool:
        return version == self.version and all(
            torch.equal(a, b.to(a.device)) for a, b in zip(self.batch.to_dict().values(), batch.to_dict().values())
        )


class PolicyLearner:
    def __init__(
        self,
        model_path: str,
        lora: LoraConfig,
        ppo: PPOConfig,
        *,
        dtype: str = "float32",
        precision: str = "fp32",
        seed: int = 0,
        trust_remote_code: bool = False,
        deepspeed_config: dict | None = None,
        update_threads: int | None = None,
        reuse_first_forward: bool = True,
    ):
        torch.manual_seed(seed)  # the value head's initial weights
        self.device = default_device()
        self.ppo = ppo
        self.module = build_learner_module(
            model_path,
            lora,
            ppo.temperature,
            value_head=ppo.uses_critic,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            device=self.device,
        )
        self.model, self.value_head = self.module.policy, self.module.value_head
        self.backend = make_backend(
            self.module, self.trainable_parameters(), ppo.lr, ppo.max_grad_norm, deepspeed_config
        )
        if self.backend.casts_to_bf16:
            self.precision = Precision(False, "bf16 (deepspeed.bf16)")  # the engine casts the model itself
        else:
            self.precision = resolve_precision(precision, self.device.type)
        print(f"[learner] device {self.device}, precision {self.precision.why}", flush=True)
        self.generator = torch.Generator().manual_seed(seed)  # minibatch order
        self.version = 0  # bumped by every update
        self.update_threads = update_threads or len(os.sched_getaffinity(0))
        # with a deterministic forward, the update's first micro-batch reuses the old-log-prob forward
        self.reuse_first_forward = reuse_first_forward and not has_dropout(self.model)
        self.first_order: torch.Tensor | None = None  # the coming update's first-epoch row order
        self.held: HeldForward | None = None

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        head = list(self.value_head.parameters()) if self.value_head is not None else []
        return [p for p in self.model.parameters() if p.requires_grad] + head

    def _forward(self, batch: PackedBatch, entropy: bool = False):
        """Log-probs, entropy and values (None without a critic); fp32, from bf16 logits under bf16-mixed."""
        with autocast(self.precision, self.device.type):
            return self.backend.forward(batch, entropy=entropy)

    def logprobs_and_values(self, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, A) old log-probs and values (None without a critic), with the same code path the update uses.

        Draws the coming update's first-epoch row order. With `reuse_first_forward`, the rows of its
        first micro-batch are run with gradients and the result is held for that micro-step.
        """
        batch = batch.to(self.device)
        n = batch.input_ids.size(0)
        self.first_order = torch.randperm(n, generator=self.generator)
        self.held = None
        held_rows = self.first_order[:0]
        if self.reuse_first_forward and n >= self.ppo.minibatch_size:  # (else the update runs no minibatch)
            held_rows = self.first_order[: self.ppo.micro_batch_size or self.ppo.minibatch_size]
        logprobs = torch.zeros(batch.response_ids.shape)
        values = torch.zeros(batch.response_ids.shape) if self.value_head is not None else None
        if len(held_rows):
            self.module.train()
            out, held_values = self._forward(batch.select(held_rows), entropy=True)
            self.held = HeldForward(batch, self.version, held_rows, out, held_values)
            logprobs[held_rows] = out.logprobs.detach().cpu()
            if values is not None:
                values[held_rows] = held_values.detach().cpu()
        rest = self.first_order[len(held_rows) :]
        if len(rest):
            self.module.eval()
            with torch.no_grad():
                out, rest_values = self._forward(batch.select(rest))
            logprobs[rest] = out.logprobs.cpu()
            if values is not None:
                values[rest] = rest_values.cpu()
        return logprobs, values

    def train_step(self, experience: Experience, kl_coef: float = 0.0) -> UpdateStats:
        """PPO epochs over shuffled minibatches, with gradient accumulation over micro-batches.

        `kl_coef` weighs the KL-to-reference loss term when `ppo.kl_in` is `loss` (else it is unused).
        An optimizer step whose loss or gradient norm is NaN/inf is skipped (weights and optimizer
        state unchanged) and counted in `skipped_steps`; if every step is skipped the version stays.
        """
        threads = torch.get_num_threads()
        torch.set_num_threads(self.update_threads)  # the other actors wait during the update
        try:
            return self._train_epochs(experience, kl_coef if self.ppo.kl_in == "loss" else 0.0)
        finally:
            torch.set_num_threads(threads)
            self.first_order, self.held = None, None

    def _train_epochs(self, experience: Experience, kl_coef: float) -> UpdateStats:
        self.module.train()
        n = experience.batch.input_ids.size(0)
        mb, micro = self.ppo.minibatch_size, self.ppo.micro_batch_size or self.ppo.minibatch_size
        totals: dict[str, float] = {}
        updates = skipped = 0
        held = self.held if self.held is not None and self.held.matches(experience.batch, self.version) else None
        reused = False
        for epoch in range(self.ppo.ppo_epochs):
            if epoch == 0 and self.first_order is not None and len(self.first_order) == n:
                order = self.first_order  # drawn with the old log-probs
            else:
                order = torch.randperm(n, generator=self.generator)
            for start in range(0, n - mb + 1, mb):
                rows = order[start : start + mb]
                aggregate = LossAggregation.over(
                    self.ppo.loss_aggregation, experience.batch.response_mask[rows], self.ppo.max_new_tokens
                )
                self.backend.zero_grad()
                step: dict[str, float] = {}
                for micro_start in range(0, mb, micro):
                    micro_rows = rows[micro_start : micro_start + micro]
                    outputs = None
                    first = epoch == start == micro_start == 0  # no optimizer step yet: the held forward's weights
                    if first and held is not None and torch.equal(micro_rows, held.rows):
                        outputs, reused = (held.outputs, held.values), True
                    exp = experience.select(micro_rows)
                    for key, value in self._micro_step(exp, aggregate, kl_coef, len(micro_rows) / mb, outputs).items():
                        step[key] = step.get(key, 0.0) + value
                if not self.backend.step(step):
                    skipped += 1
                    continue
                updates += 1
                for key, value in step.items():
                    totals[key] = totals.get(key, 0.0) + value
        if updates:
            self.version += 1
        return {key: value / updates for key, value in totals.items()} | {
            "policy_version": self.version,
            "skipped_steps": skipped,
            "update_skipped": float(updates == 0),
            "reused_first_forward": float(reused),
        }

    def _micro_step(
        self,
        exp: Experience,
        aggregate: LossAggregation,
        kl_coef: float,
        weight: float,
        outputs: tuple[ResponseOutputs, torch.Tensor | None] | None = None,
    ) -> dict[str, float]:
        """Loss and backward of one micro-batch; `outputs` are its forward's, when already run.

        Returns the micro-batch's part of the minibatch's statistics: its share of each loss (`aggregate`
        normalises by the minibatch's totals), and its means weighted by `weight`, its share of the rows.
        """
        ppo = self.ppo
        exp = exp.to(self.device)
        out, values = outputs if outputs is not None else self._forward(exp.batch, entropy=True)
        mask = exp.batch.response_mask
        loss, pg_stats = policy_loss(
            out.logprobs,
            exp.old_logprobs,
            exp.advantages,
            mask,
            ppo.clip_range,
            clip_range_low=ppo.clip_range_low,
            clip_range_high=ppo.clip_range_high,
            aggregate=aggregate,
        )
        shares = {"policy_loss": loss.item()}
        means = {"entropy": masked_mean(out.entropy, mask), **pg_stats}
        if values is not None:
            vf_loss, vf_stats = value_loss(values, exp.values, exp.returns, mask, ppo.clip_range_value, aggregate)
            loss = loss + ppo.vf_coef * vf_loss
            shares["value_loss"] = vf_loss.item()
            means.update(vf_stats)
        if kl_coef:
            kl_term = kl_loss(out.logprobs, exp.ref_logprobs, mask, ppo.kl_estimator, aggregate)
            loss = loss + kl_coef * kl_term
            shares["kl_loss"] = kl_term.item()
        stats = shares | {name: float(value) * weight for name, value in means.items()}
        if not all_finite(stats):
            loss = loss * math.nan  # NaN gradients: the backend skips the minibatch's step
        self.backend.backward(loss)
        return stats

    def export_adapter(self) -> AdapterPayload:
        with tempfile.TemporaryDirectory() as folder:
            self.model.save_pretrained(folder)
            files = {
                p.name: p.read_bytes()
                for p in Path(folder).iterdir()
                if p.is_file() and p.suffix in (".json", ".safetensors")
            }
        return AdapterPayload(self.version, files)

    def export_merged_weights(self) -> MergedWeights:
        """The adapted modules' weights with the LoRA update folded in, on the CPU, for the generators."""
        return MergedWeights(self.version, merged_lora_weights(self.model))

    def save(self, folder: str | Path) -> None:
        """Adapter, value head, optimizer and minibatch RNG into `folder` (the caller makes it atomic)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        self.model.save_pretrained(folder / "adapter")
        if self.value_head is not None:
            head = {k: v.contiguous() for k, v in self.value_head.state_dict().items()}
            save_file(head, str(folder / "value_head.safetensors"))
        state = {"generator": self.generator.get_state(), **self.backend.save(folder)}
        buffer = io.BytesIO()
        torch.save(state, buffer)
        (folder / "learner_state.pt").write_bytes(buffer.getvalue())
        (folder / "learner.json").write_text(json.dumps({"version": self.version}))

    def load(self, folder: str | Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        folder = Path(folder)
        set_peft_model_state_dict(self.model, load_file(str(folder / "adapter" / "adapter_model.safetensors")))
        if self.value_head is not None:
            self.value_head.load_state_dict(load_file(str(folder / "value_head.safetensors")))
        state = weights_only_load(folder / "learner_state.pt")
        self.backend.load(folder, state)
        self.generator.set_state(state["generator"])
        self.version = json.loads((folder / "learner.json").read_text())["version"]

    def export_merged(self, folder: str | Path, tokenizer_path: str) -> None:
        """The merged policy (transformers format) and its adapter (peft format) for the final output."""

        folder = Path(folder)
        self.model.save_pretrained(folder / "adapter")
        merged = self.model.merge_and_unload()
        merged.save_pretrained(folder / "model")
        load_tokenizer(tokenizer_path).save_pretrained(folder / "model")
