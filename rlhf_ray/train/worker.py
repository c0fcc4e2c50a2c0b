"""The per-worker function of the SFT and RM Ray Train jobs (DeepSpeed inside Ray Train).

Runs on every worker: rebuild the typed config, build the model, `deepspeed.initialize`,
resume from the newest complete checkpoint if there is one, train with periodic eval and
checkpoints reported through `ray.train.report`, and export the final model on rank 0.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from rlhf_ray import dashboard_metrics
from rlhf_ray.checkpoints import CheckpointError, problem_with, write_manifest
from rlhf_ray.config import config_from_dict
from rlhf_ray.models.optim import settle_bf16, warmup_cosine
from rlhf_ray.models.precision import Precision, autocast, resolve_precision
from rlhf_ray.models.safe_load import load_deepspeed_checkpoint, weights_only_load
from rlhf_ray.run_log import MetricsLog
from rlhf_ray.train.batches import epoch_batches
from rlhf_ray.train.export import export_model
from rlhf_ray.train.tasks import TASKS

FP32 = Precision(False, "fp32")
DS_TAG = "deepspeed"


@dataclass
class Position:
    """Where training is; saved in every checkpoint so a resumed run continues exactly."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    micro_in_epoch: int = 0  # micro-batches of `epoch` already consumed


def all_reduce_sums(sums: dict[str, float]) -> dict[str, float]:
    keys = sorted(sums)
    tensor = torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return dict(zip(keys, tensor.tolist()))


def add_sums(total: dict[str, float], sums: dict[str, torch.Tensor]) -> None:
    for key, value in sums.items():
        total[key] = total.get(key, 0.0) + float(value)


def all_ranks_true(mine: bool) -> bool:
    """True when `mine` is true on every worker."""
    flag = torch.tensor([1.0 if mine else 0.0])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() == 1.0)


def all_ranks_finite(loss: torch.Tensor) -> bool:
    """True when the loss is finite on every worker (all workers skip a micro-batch together, or none does)."""
    return all_ranks_true(bool(torch.isfinite(loss.detach()).all()))


def gradients_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)


def step_unless_nonfinite(engine) -> bool:
    """`engine.step()`; False when it reached an accumulation boundary and skipped the update for NaN/inf gradients
    (weights, optimizer state and learning-rate schedule unchanged; the gradients cleared).

    DeepSpeed's ZeRO and fp16/bf16 optimizers detect such a step and skip it themselves; its plain path (ZeRO stage
    0 without DeepSpeed's own fp16/bf16) would apply it, so there the reduced gradients are checked first, on every
    worker, and the update is replaced by clearing them (the engine's step and micro-batch counters still advance)."""
    boundary = engine.is_gradient_accumulation_boundary()
    plain = not (engine.zero_optimization() or engine.fp16_enabled() or engine.bfloat16_enabled())
    if boundary and plain and not all_ranks_true(gradients_finite(engine.module)):
        engine._take_model_step = lambda *args, **kwargs: engine.zero_grad()  # this one call only
        try:
            engine.step()
        finally:
            del engine._take_model_step
        return False
    engine.step()
    return not boundary or engine.was_step_applied()


def zero_gradient_loss(model: torch.nn.Module) -> torch.Tensor:
    """A loss of 0 whose gradient is exactly 0 for every trainable parameter: what a skipped micro-batch
    backpropagates, so the engine's accumulation and its gradient reduction across workers go on unchanged."""
    return sum((p * 0).sum() for p in model.parameters() if p.requires_grad)


def on_device(chunks: list[dict[str, torch.Tensor]], engine) -> list[dict[str, torch.Tensor]]:
    """Move a micro-batch's collated chunks to the engine's device (the worker's GPU, or the CPU)."""
    return [{key: value.to(engine.device) for key, value in chunk.items()} for chunk in chunks]


def evaluate(
    engine, task, rows, rank, world, batch_size, pad_id, config, precision: Precision = FP32
) -> dict[str, float]:
    """Eval sums over this worker's share of the held-out rows, all-reduced across workers.

    Every worker runs the same number of forward passes: under ZeRO-3 each one gathers parameters from
    all workers, so a worker with a smaller share runs filler batches whose sums it drops. (One padded
    pass per batch, chunk size 0, so a short batch needs no fewer passes than a full one.)
    """
    engine.eval()
    sums: dict[str, float] = {}
    mine = rows[rank::world]
    largest_share = math.ceil(len(rows) / world)
    passes = math.ceil(largest_share / batch_size)
    with torch.no_grad():
        for start in range(0, passes * batch_size, batch_size):
            batch = mine[start : start + batch_size]
            chunks = on_device(task.collate(batch or rows[:1], pad_id, 0, config), engine)
            with autocast(precision, engine.device.type):
                _, batch_sums = task.loss_and_sums(engine, chunks, config)
            add_sums(sums, batch_sums if batch else {k: 0.0 for k in batch_sums})
    engine.train()
    return all_reduce_sums(sums)


def save_checkpoint(engine, position: Position, metrics: dict, rank: int) -> None:
    """All ranks save their DeepSpeed shards and RNG state into one Ray Train checkpoint; each rank's
    manifest (sizes and checksums of its files) is written last."""
    import ray.train

    with tempfile.TemporaryDirectory() as folder:
        engine.save_checkpoint(folder, tag=DS_TAG)
        torch.save(torch.get_rng_state(), os.path.join(folder, f"rng_rank{rank}.pt"))
        if rank == 0:
            Path(folder, "position.json").write_text(json.dumps(asdict(position)))
        write_manifest(Path(folder), {"step": position.step, "rank": rank}, name=f"manifest_rank{rank}.json")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def checkpoint_problem(folder: Path, world: int) -> str | None:
    """None if every rank's files in `folder` match that rank's manifest."""
    manifests = sorted(p.name for p in folder.glob("manifest_rank*.json"))
    if len(manifests) != world:
        return f"{len(manifests)} rank manifests for {world} workers"
    for rank in range(world):
        name = f"manifest_rank{rank}.json"
        needed = [f"rng_rank{rank}.pt", *(["position.json"] if rank == 0 else [])]
        problem = problem_with(folder, name, required=needed)
        if problem:
            return problem
    return None


def usable_checkpoint(folder: Path, any_registered: bool, world: int, rank: int) -> Path | None:
    """The newest complete checkpoint in `folder` (each damaged one skipped is named), or None to start afresh.

    A checkpoint that every worker persisted counts even when Ray Train's controller had not registered it
    yet (a run stopped right after saving); with none complete, a run that registered one refuses to start
    over, while one that never registered any starts afresh (an interrupted first save)."""
    candidates = sorted(p for p in folder.glob("checkpoint_*") if p.is_dir())
    for candidate in reversed(candidates):
        problem = checkpoint_problem(candidate, world)
        if problem is None:
            return candidate
        if rank == 0:
            print(f"WARNING: skipping checkpoint {candidate}: {problem}", flush=True)
    if not any_registered:
        return None
    raise CheckpointError(
        f"no complete checkpoint under {folder} (see the warnings above); refusing to "
        "start over. Move the folder away to start afresh."
    )


def restore_checkpoint(engine, rank: int, world: int, checkpoints: Path) -> Position:
    """Load the newest complete checkpoint under `checkpoints` (run_stage keeps them on a file system)."""
    import ray.train

    folder = usable_checkpoint(checkpoints, ray.train.get_checkpoint() is not None, world, rank)
    if folder is None:
        return Position()
    load_deepspeed_checkpoint(engine, folder, tag=DS_TAG)
    position = Position(**json.loads(Path(folder, "position.json").read_text()))
    rng = Path(folder, f"rng_rank{rank}.pt")
    if rng.exists():
        torch.set_rng_state(weights_only_load(rng))
    return position


def skip_lone_allreduce(engine, world: int) -> None:
    """A single worker has no gradients to average, but DeepSpeed's ZeRO stage-0 reduction still copies every
    gradient into flat buffers and back (a measurable share of a step on 2 CPU cores): turn it off."""
    if world == 1 and engine.zero_optimization_stage() == 0:
        engine.enable_backward_allreduce = False


class WorkerJob:
    """One worker's share of an SFT or RM run: set-up, the step loop, and export."""

    def __init__(self, loop_config: dict):
        import deepspeed
        import ray.train

        self.loop_config = loop_config
        self.config = config_from_dict(loop_config["config"])
        self.task = TASKS[loop_config["stage"]]
        self.stage = getattr(self.config, self.task.name)
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.train_rows, self.eval_rows = loop_config["data"]["train"], loop_config["data"]["eval"]
        self.pad_id = loop_config["pad_id"]
        self.store = self.config.run.store
        if self.store is not None:  # this node's working copy of what the worker reads (it may be a new node)
            reads = ("model_path", "tokenizer_path", "checkpoints")
            self.store.pull_paths(*(loop_config[key] for key in reads), Path(loop_config["output_dir"], METRICS))

        torch.manual_seed(self.config.run.seed)  # identical initial adapter / head on every rank
        model = self.task.build_model(self.config, loop_config["model_path"], self.pad_id)
        micro = len(self._epoch_micro_batches(0, truncate=False))
        self.steps_per_epoch = micro // self.stage.grad_accum
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{len(self.train_rows)} training rows are fewer than one optimizer step needs "
                f"(batch_size {self.stage.batch_size} x grad_accum {self.stage.grad_accum} x {self.world} workers)"
            )
        self.total_steps = self.stage.max_steps or self.stage.epochs * self.steps_per_epoch
        schedule = warmup_cosine(self.total_steps, self.stage.warmup_ratio)
        self.engine, *_ = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=settle_bf16(loop_config["deepspeed"]),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
        )
        skip_lone_allreduce(self.engine, self.world)
        self.stopped: str | None = None  # why training stopped early (then nothing is exported)
        self.position = self._restore(loop_config["output_dir"])
        self.log = None
        on_cpu = self.engine.device.type == "cpu"
        # on GPUs DeepSpeed casts the model to bf16 itself (deepspeed.bf16, else model.precision); no autocast on top
        self.precision = (
            resolve_precision(self.config.model.precision)
            if on_cpu
            else Precision(False, f"DeepSpeed bf16 {'on' if self.engine.bfloat16_enabled() else 'off'}")
        )
        print(
            f"[{self.task.name}] worker {self.rank}/{self.world}: device {self.engine.device}, "
            f"precision {self.precision.why}, "
            f"{torch.get_num_threads()} torch threads (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})",
            flush=True,
        )
        if self.rank == 0 and self.stopped is None:  # (a refused checkpoint leaves the run's metrics as they are)
            self.log = MetricsLog(loop_config["output_dir"], resume_step=self.position.step)
            if self.position.step:
                print(
                    f"[{self.task.name}] resumed from checkpoint at step {self.position.step} "
                    f"(epoch {self.position.epoch})",
                    flush=True,
                )
        self.train_sums: dict[str, float] = {}
        self.eval_sums: dict[str, float] = {}
        self.nonfinite_steps = 0  # optimizer steps with a NaN/inf loss in a micro-batch or NaN/inf gradients
        self.nonfinite_in_a_row = 0
        self.since = time.perf_counter()  # start of the current logging interval (excludes eval and checkpoints)

    def _restore(self, output_dir: str) -> Position:
        """The checkpoint's position. A checkpoint refused on any worker (none complete, or a file that asks to
        run code) stops every worker: a restarted group would meet it again. A refusing worker writes its
        reason to `stopped.json` before the workers agree, so rank 0 (in `finish`) never overwrites it."""
        try:
            position = restore_checkpoint(self.engine, self.rank, self.world, Path(self.loop_config["checkpoints"]))
        except CheckpointError as err:
            Path(output_dir, STOPPED).write_text(json.dumps({"reason": str(err), "kind": "checkpoint"}) + "\n")
            self._send(STOPPED)
            position, self.stopped = Position(), str(err)
        if not all_ranks_true(self.stopped is None):
            self.stopped = self.stopped or "another worker refused the checkpoint"
        return position

    def _epoch_micro_batches(self, epoch: int, truncate: bool = True) -> list[list[int]]:
        micro = epoch_batches(
            len(self.train_rows), self.stage.batch_size, self.rank, self.world, self.config.data.seed, epoch
        )
        return micro[: self.steps_per_epoch * self.stage.grad_accum] if truncate else micro

    def _evaluate(self) -> dict[str, float]:
        self.eval_sums = evaluate(
            self.engine,
            self.task,
            self.eval_rows,
            self.rank,
            self.world,
            self.stage.batch_size,
            self.pad_id,
            self.config,
            self.precision,
        )
        return self.task.eval_metrics(self.eval_sums)

    def _end_of_step(self, epoch_done: bool) -> dict:
        """After an optimizer step: metrics, eval, log line, checkpoint."""
        position, stage = self.position, self.stage
        done = position.step == self.total_steps
        metrics: dict = {}
        if (position.step % stage.log_every == 0 or done) and self.train_sums:  # (empty: all skipped)
            reduced = all_reduce_sums(self.train_sums)
            metrics.update(
                self.task.train_metrics(reduced),
                lr=self.engine.get_lr()[0],
                epoch=position.epoch,
                tokens_per_s=reduced["seq_tokens"] / max(time.perf_counter() - self.since, 1e-9),
                nonfinite_steps=self.nonfinite_steps,
            )
            self.train_sums = {}
        if (stage.eval_every and position.step % stage.eval_every == 0 or done) and self.eval_rows:
            metrics.update(self._evaluate())
        if metrics:
            self._record(position.step, metrics)
        if epoch_done:
            position.epoch, position.micro_in_epoch = position.epoch + 1, 0
        if stage.checkpoint_every and position.step % stage.checkpoint_every == 0 or done:
            save_checkpoint(self.engine, position, {"step": position.step, **metrics}, self.rank)
            if self.rank == 0:
                self._send(METRICS, "tensorboard")
        if not self.train_sums:  # a logging interval closed; the next starts after eval and checkpointing
            self.since = time.perf_counter()
        return metrics

    def train(self) -> None:
        from tqdm import tqdm

        position, task = self.position, self.task
        if self.stopped is not None:  # the checkpoint was refused
            return
        if position.step == 0 and self.eval_rows and self.stage.eval_every:
            self._log_untrained_eval()
        bar = tqdm(
            total=self.total_steps, initial=position.step, desc=task.name, disable=self.rank != 0, mininterval=2.0
        )
        step_skipped_a_micro_batch = False
        while position.step < self.total_steps and self.stopped is None:
            micro = self._epoch_micro_batches(position.epoch)
            for indices in micro[position.micro_in_epoch :]:
                rows = [self.train_rows[i] for i in indices]
                chunks = on_device(task.collate(rows, self.pad_id, self.stage.chunk_size, self.config), self.engine)
                with autocast(self.precision, self.engine.device.type):
                    loss, sums = task.loss_and_sums(self.engine, chunks, self.config)
                if all_ranks_finite(loss):
                    add_sums(self.train_sums, sums)
                else:  # NaN/inf: this micro-batch adds no gradient
                    loss, step_skipped_a_micro_batch = zero_gradient_loss(self.engine.module), True
                self.engine.backward(loss)
                if not step_unless_nonfinite(self.engine):  # finite loss, non-finite gradient: no update
                    step_skipped_a_micro_batch = True
                position.micro_in_epoch += 1
                if position.micro_in_epoch % self.stage.grad_accum:
                    continue
                position.step += 1
                self._count_nonfinite(step_skipped_a_micro_batch)
                step_skipped_a_micro_batch = False
                if self.stopped is not None:
                    break
                if self.loop_config.get("after_step") is not None:  # an observer (tests inject faults here)
                    self.loop_config["after_step"](position.step, self.rank)
                epoch_done = position.micro_in_epoch == len(micro)
                metrics = self._end_of_step(epoch_done)
                bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if k in PROGRESS_KEYS}, refresh=False)
                bar.update(1)
                if epoch_done or position.step == self.total_steps:
                    break
        bar.close()

    def _count_nonfinite(self, skipped: bool) -> None:
        """Count a step that skipped a micro-batch or its update for NaN/inf; stop after `max_nonfinite_in_a_row` in
        a row."""
        self.nonfinite_steps += skipped
        self.nonfinite_in_a_row = self.nonfinite_in_a_row + 1 if skipped else 0
        limit = self.stage.max_nonfinite_in_a_row
        if self.nonfinite_in_a_row >= limit:
            self.stopped = (
                f"{self.task.name}: the loss or the gradients were not finite (NaN/inf) in {limit} optimizer steps "
                f"in a row, up to step {self.position.step} ({self.task.name}.max_nonfinite_in_a_row={limit}); "
                f"nothing was exported. Lower {self.task.name}.lr, check the data and the model's weights"
            )

    def _log_untrained_eval(self) -> None:
        """Eval before the first step, logged at step 0, so the curves start from the untrained value."""
        metrics = self._evaluate()
        self.eval_sums = {}  # the export's statistics come from the final eval, never from this one
        self._record(0, metrics)
        self.since = time.perf_counter()

    def _record(self, step: int, metrics: dict) -> None:
        """Rank 0 writes the metrics line and publishes the dashboard gauges."""
        if self.log is not None:
            self.log.log(step, metrics)
            dashboard_metrics.publish(metrics, self.config.run.name, self.task.name)

    def finish(self) -> None:
        """Export the model, unless training stopped early or a weight is not finite: then rank 0 writes the
        reason to `stopped.json` in the stage folder, where the driver reads it."""
        if self.stopped is None:
            if not self.eval_sums and self.eval_rows:
                self._evaluate()
            self.stopped = export_model(
                self.engine, self.task, self.config, self.loop_config, self.rank, self.eval_sums
            )
        stopped_file = Path(self.loop_config["output_dir"], STOPPED)
        if self.store is not None and self.rank == 0:  # a reason another worker wrote on its node
            self.store.pull_paths(stopped_file)
        if self.stopped is not None and self.rank == 0 and not stopped_file.exists():
            stopped_file.write_text(json.dumps({"reason": self.stopped, "kind": "nonfinite"}) + "\n")
        if self.log is not None:
            self.log.close()
        if self.rank == 0:
            self._send(METRICS, "tensorboard", STOPPED, "model", "adapter")

    def _send(self, *names: str) -> None:
        """With an object-store run folder: these files or folders of the stage go to the store from this node,
        replacing what the store held under those names."""
        if self.store is not None:
            out = Path(self.loop_config["output_dir"])
            self.store.push(*(self.store.relative(out / name) for name in names), delete_missing=True)


PROGRESS_KEYS = ("loss", "tokens_per_s", "eval_loss", "eval_accuracy")
METRICS = "metrics.jsonl"
STOPPED = "stopped.json"  # why a stage stopped without exporting (NaN/inf, a refused checkpoint), for the driver


def train_fn_per_worker(loop_config: dict) -> None:
    job = WorkerJob(loop_config)
    job.train()
    job.finish()
