"""PolicyLearner: the SFT model with a LoRA adapter and a value head; PPO updates.

Two optimizer backends with the same algorithm (same AdamW settings, clipping and step skipping):
plain torch AdamW (`ppo.learner_backend: torch`, the CPU default: with one learner process ZeRO has
nothing to shard, and DeepSpeed's CPU path gave no speed-up), or a DeepSpeed engine
(`deepspeed`: ZeRO stage 1/2, bf16 where the GPU has it), which skips a step whose gradients are
not finite by itself.
"""

from __future__ import annotations

import io
import json
import math
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_ray.algo.losses import masked_mean
from rlhf_ray.algo.ppo import policy_loss, value_loss
from rlhf_ray.config import LoraConfig, PPOConfig
from rlhf_ray.models.forward import ResponseOutputs
from rlhf_ray.models.loading import default_device
from rlhf_ray.models.optim import LEARNER_ADAMW
from rlhf_ray.models.policy import build_policy_with_value_head, has_dropout, merged_lora_weights
from rlhf_ray.models.precision import Precision, autocast, resolve_precision
from rlhf_ray.wire import AdapterPayload, Experience, MergedWeights, PackedBatch


@dataclass
class HeldForward:
    """The coming update's first micro-batch, run by `logprobs_and_values` with its autograd graph kept.

    The update's first forward sees the same weights and rows, so it would compute exactly this again.
    """

    batch: PackedBatch  # the whole batch the old log-probs were computed for (on the learner's device)
    version: int  # the policy version it was run with
    rows: torch.Tensor  # the micro-batch's rows in `batch`
    outputs: ResponseOutputs
    values: torch.Tensor

    def matches(self, batch: PackedBatch, version: int) -> bool:
        return version == self.version and all(torch.equal(a, b.to(a.device)) for a, b in zip(
            self.batch.to_dict().values(), batch.to_dict().values()))


def start_deepspeed(module: torch.nn.Module, parameters: list, ds_config: dict):
    """A one-process DeepSpeed engine inside this actor (gloo on CPU, nccl on a GPU)."""
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        with socket.socket() as probe:  # a free local port for the one-member process group
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    engine, *_ = deepspeed.initialize(model=module, model_parameters=parameters, config=ds_config)
    return engine


class PolicyLearner:
    def __init__(self, model_path: str, lora: LoraConfig, ppo: PPOConfig, *, dtype: str = "float32",
                 precision: str = "fp32", seed: int = 0, trust_remote_code: bool = False,
                 deepspeed_config: dict | None = None, update_threads: int | None = None, reuse_first_forward: bool = True):
        torch.manual_seed(seed)  # the value head's initial weights
        self.device = default_device()
        self.ppo = ppo
        self.module = build_policy_with_value_head(model_path, lora, ppo.temperature, dtype=dtype,
                                                   trust_remote_code=trust_remote_code, device=self.device)
        self.model, self.value_head = self.module.policy, self.module.value_head
        self.engine = start_deepspeed(self.module, self.trainable_parameters(), deepspeed_config) if deepspeed_config else None
        if deepspeed_config and deepspeed_config.get("bf16", {}).get("enabled"):
            self.precision = Precision(False, "bf16 (deepspeed.bf16)")  # the engine casts the model itself
        else:
            self.precision = resolve_precision(precision, self.device.type)
        print(f"[learner] device {self.device}, precision {self.precision.why}", flush=True)
        self.optimizer = None if self.engine is not None else torch.optim.AdamW(self.trainable_parameters(), lr=ppo.lr, **LEARNER_ADAMW)
        self.generator = torch.Generator().manual_seed(seed)  # minibatch order
        self.version = 0  # bumped by every update
        self.update_threads = update_threads or len(os.sched_getaffinity(0))
        # with a deterministic forward, the update's first micro-batch reuses the old-log-prob forward
        self.reuse_first_forward = reuse_first_forward and not has_dropout(self.model)
        self.first_order: torch.Tensor | None = None  # the coming update's first-epoch row order
        self.held: HeldForward | None = None

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad] + list(self.value_head.parameters())

    def _forward(self, batch: PackedBatch, entropy: bool = False):
        """Log-probs, entropy and values (fp32, from bf16 logits under bf16-mixed precision)."""
        with autocast(self.precision, self.device.type):
            return (self.engine if self.engine is not None else self.module)(batch, entropy=entropy)

    def logprobs_and_values(self, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) old log-probs and values, with the same code path the update uses.

        Draws the coming update's first-epoch row order. With `reuse_first_forward`, the rows of its
        first micro-batch are run with gradients and the result is held for that micro-step.
        """
        batch = batch.to(self.device)
        n = batch.input_ids.size(0)
        self.first_order = torch.randperm(n, generator=self.generator)
        self.held = None
        held_rows = self.first_order[:0]
        if self.reuse_first_forward and n >= self.ppo.minibatch_size:  # (else the update runs no minibatch)
            held_rows = self.first_order[:self.ppo.micro_batch_size or self.ppo.minibatch_size]
        logprobs = torch.zeros(batch.response_ids.shape)
        values = torch.zeros(batch.response_ids.shape)
        if len(held_rows):
            self.module.train()
            out, held_values = self._forward(batch.select(held_rows), entropy=True)
            self.held = HeldForward(batch, self.version, held_rows, out, held_values)
            logprobs[held_rows], values[held_rows] = out.logprobs.detach().cpu(), held_values.detach().cpu()
        rest = self.first_order[len(held_rows):]
        if len(rest):
            self.module.eval()
            with torch.no_grad():
                out, rest_values = self._forward(batch.select(rest))
            logprobs[rest], values[rest] = out.logprobs.cpu(), rest_values.cpu()
        return logprobs, values

    def train_step(self, experience: Experience) -> dict[str, float]:
        """PPO epochs over shuffled minibatches, with gradient accumulation over micro-batches.

        An optimizer step whose loss or gradient norm is NaN/inf is skipped (weights and optimizer
        state unchanged) and counted in `skipped_steps`; if every step is skipped the version stays.
        """
        threads = torch.get_num_threads()
        torch.set_num_threads(self.update_threads)  # the other actors wait during the update
        try:
            return self._train_epochs(experience)
        finally:
            torch.set_num_threads(threads)
            self.first_order, self.held = None, None

    def _train_epochs(self, experience: Experience) -> dict[str, float]:
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
                rows = order[start:start + mb]
                if self.optimizer is not None:
                    self.optimizer.zero_grad(set_to_none=True)
                step: dict[str, float] = {}
                for micro_start in range(0, mb, micro):
                    micro_rows = rows[micro_start:micro_start + micro]
                    outputs = None
                    first = epoch == start == micro_start == 0  # no optimizer step yet: the held forward's weights
                    if first and held is not None and torch.equal(micro_rows, held.rows):
                        outputs, reused = (held.outputs, held.values), True
                    for key, value in self._micro_step(experience.select(micro_rows), mb, outputs).items():
                        step[key] = step.get(key, 0.0) + value * len(micro_rows) / mb
                if not self._optimizer_step(step):
                    skipped += 1
                    continue
                updates += 1
                for key, value in step.items():
                    totals[key] = totals.get(key, 0.0) + value
        if updates:
            self.version += 1
        return {key: value / updates for key, value in totals.items()} | {
            "policy_version": self.version, "skipped_steps": skipped, "update_skipped": float(updates == 0),
            "reused_first_forward": float(reused)}

    def _optimizer_step(self, step: dict[str, float]) -> bool:
        """Clip and apply the minibatch's accumulated gradients unless the loss or gradient norm is NaN/inf.
        Records `grad_norm` (before clipping) in `step`; False when the step was skipped."""
        if self.engine is not None:  # the micro-steps already called engine.step(); the last one was the boundary
            norm = self.engine.get_global_grad_norm()
            step["grad_norm"] = float(norm) if norm is not None else math.nan
            return self.engine.was_step_applied()
        step["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), self.ppo.max_grad_norm))
        if not all(math.isfinite(value) for value in step.values()):
            self.optimizer.zero_grad(set_to_none=True)
            return False
        self.optimizer.step()
        return True

    def _micro_step(self, exp: Experience, minibatch_rows: int,
                    outputs: tuple[ResponseOutputs, torch.Tensor] | None = None) -> dict[str, float]:
        """Loss and backward of one micro-batch; `outputs` are its forward's, when already run."""
        exp = exp.to(self.device)
        out, values = outputs if outputs is not None else self._forward(exp.batch, entropy=True)
        mask = exp.batch.response_mask
        pg_loss, pg_stats = policy_loss(out.logprobs, exp.old_logprobs, exp.advantages, mask, self.ppo.clip_range)
        vf_loss, vf_stats = value_loss(values, exp.values, exp.returns, mask, self.ppo.clip_range_value)
        loss = pg_loss + self.ppo.vf_coef * vf_loss
        share = loss * exp.batch.input_ids.size(0) / minibatch_rows  # of the minibatch's mean loss
        stats = {"policy_loss": pg_loss.item(), "value_loss": vf_loss.item(), "entropy": masked_mean(out.entropy, mask).item(),
                 **{k: float(v) for k, v in {**pg_stats, **vf_stats}.items()}}
        if self.engine is not None:
            if not all(math.isfinite(value) for value in stats.values()):
                share = share * math.nan  # DeepSpeed then skips the step, as the torch backend does for any NaN stat
            self.engine.backward(share, scale_wrt_gas=False)
            self.engine.step()  # applies the update only at the minibatch's last micro-batch
        else:
            share.backward()
        return stats

    def export_adapter(self) -> AdapterPayload:
        with tempfile.TemporaryDirectory() as folder:
            self.model.save_pretrained(folder)
            files = {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file() and p.suffix in (".json", ".safetensors")}
        return AdapterPayload(self.version, files)

    def export_merged_weights(self) -> MergedWeights:
        """The adapted modules' weights with the LoRA update folded in, on the CPU, for the generators."""
        return MergedWeights(self.version, merged_lora_weights(self.model))

    def save(self, folder: str | Path) -> None:
        """Adapter, value head, optimizer and minibatch RNG into `folder` (the caller makes it atomic)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        self.model.save_pretrained(folder / "adapter")
        save_file({k: v.contiguous() for k, v in self.value_head.state_dict().items()}, str(folder / "value_head.safetensors"))
        state = {"generator": self.generator.get_state()}
        if self.engine is not None:  # optimizer state in DeepSpeed's own layout; the frozen base weights are not copied
            self.engine.save_checkpoint(str(folder / "deepspeed"), tag="learner", save_latest=False,
                                        exclude_frozen_parameters=True)
        else:
            state["optimizer"] = self.optimizer.state_dict()
        buffer = io.BytesIO()
        torch.save(state, buffer)
        (folder / "learner_state.pt").write_bytes(buffer.getvalue())
        (folder / "learner.json").write_text(json.dumps({"version": self.version}))

    def load(self, folder: str | Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        folder = Path(folder)
        set_peft_model_state_dict(self.model, load_file(str(folder / "adapter" / "adapter_model.safetensors")))
        self.value_head.load_state_dict(load_file(str(folder / "value_head.safetensors")))
        state = torch.load(folder / "learner_state.pt", weights_only=True)
        if self.engine is not None:
            if not (folder / "deepspeed").is_dir():
                raise ValueError(f"{folder} was written by the torch learner backend; it has no DeepSpeed state")
            self.engine.load_checkpoint(str(folder / "deepspeed"), tag="learner", load_module_strict=False)
        elif "optimizer" not in state:
            raise ValueError(f"{folder} was written by the deepspeed learner backend; it has no torch optimizer state")
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.version = json.loads((folder / "learner.json").read_text())["version"]

    def export_merged(self, folder: str | Path, tokenizer_path: str) -> None:
        """The merged policy (transformers format) and its adapter (peft format) for the final output."""
        from rlhf_ray.models.loading import load_tokenizer

        folder = Path(folder)
        self.model.save_pretrained(folder / "adapter")
        merged = self.model.merge_and_unload()
        merged.save_pretrained(folder / "model")
        load_tokenizer(tokenizer_path).save_pretrained(folder / "model")
