"""The per-worker function of the SFT and RM Ray Train jobs (DeepSpeed inside Ray Train).

Runs on every worker: rebuild the typed config, build the model, `deepspeed.initialize`,
resume from `ray.train.get_checkpoint()` if there is one, train with periodic eval and
checkpoints reported through `ray.train.report`, and export the final model on rank 0.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from rlhf_ray.config import config_from_dict
from rlhf_ray.train.batches import epoch_batches
from rlhf_ray.train.export import export_model
from rlhf_ray.train.model_setup import warmup_cosine
from rlhf_ray.train.tasks import TASKS

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


def evaluate(engine, task, rows, rank, world, batch_size, pad_id, config) -> dict[str, float]:
    """Eval sums over this worker's share of the held-out rows, all-reduced across workers."""
    engine.eval()
    sums: dict[str, float] = {}
    mine = rows[rank::world]
    with torch.no_grad():
        for start in range(0, len(mine), batch_size):
            _, batch_sums = task.loss_and_sums(engine, task.collate(mine[start:start + batch_size], pad_id), config)
            add_sums(sums, batch_sums)
    engine.train()
    if not sums:  # this worker had no eval rows; still join the all-reduce with zeros
        _, zero = task.loss_and_sums(engine, task.collate(rows[:1], pad_id), config)
        sums = {k: 0.0 for k in zero}
    return all_reduce_sums(sums)


def save_checkpoint(engine, position: Position, metrics: dict, rank: int) -> None:
    """All ranks save their DeepSpeed shards and RNG state into one Ray Train checkpoint."""
    import ray.train

    with tempfile.TemporaryDirectory() as folder:
        engine.save_checkpoint(folder, tag=DS_TAG)
        torch.save(torch.get_rng_state(), os.path.join(folder, f"rng_rank{rank}.pt"))
        if rank == 0:
            Path(folder, "position.json").write_text(json.dumps(asdict(position)))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def restore_checkpoint(engine, rank: int) -> Position:
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return Position()
    with checkpoint.as_directory() as folder:
        engine.load_checkpoint(folder, tag=DS_TAG)
        position = Position(**json.loads(Path(folder, "position.json").read_text()))
        rng = Path(folder, f"rng_rank{rank}.pt")
        if rng.exists():
            torch.set_rng_state(torch.load(rng, weights_only=True))
    return position


def _maybe_inject_failure(loop_config: dict, step: int, rank: int) -> None:
    """Test hook: raise once on rank 1 (or 0) at a given step; a marker file makes it happen only once."""
    spec = loop_config.get("fail_once_at_step")
    if not spec or step != spec["step"] or rank != min(1, spec.get("world", 2) - 1):
        return
    marker = Path(spec["marker"])
    if not marker.exists():
        marker.write_text(f"failed at step {step}\n")
        raise RuntimeError(f"injected failure at step {step} on rank {rank}")


def train_fn_per_worker(loop_config: dict) -> None:
    import deepspeed
    import ray.train
    from tqdm import tqdm

    config = config_from_dict(loop_config["config"])
    task = TASKS[loop_config["stage"]]
    stage = getattr(config, task.name)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    data = loop_config["data"]
    train_rows, eval_rows, pad_id = data["train"], data["eval"], loop_config["pad_id"]
    out = Path(loop_config["output_dir"])

    torch.manual_seed(config.run.seed)  # identical initial adapter / head on every rank
    model = task.build_model(config, loop_config["model_path"], pad_id)
    micro_per_epoch = len(epoch_batches(len(train_rows), stage.batch_size, rank, world, config.data.seed, 0))
    steps_per_epoch = micro_per_epoch // stage.grad_accum
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_rows)} training rows are fewer than one optimizer step needs "
                         f"(batch_size {stage.batch_size} x grad_accum {stage.grad_accum} x {world} workers)")
    total_steps = stage.max_steps or stage.epochs * steps_per_epoch
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=loop_config["deepspeed"],
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total_steps, stage.warmup_ratio)))
    position = restore_checkpoint(engine, rank)
    log = None
    if rank == 0:
        from rlhf_ray.run_log import MetricsLog

        log = MetricsLog(out, resume_step=position.step)
        if position.step:
            print(f"[{task.name}] resumed from checkpoint at step {position.step} (epoch {position.epoch})", flush=True)
    bar = tqdm(total=total_steps, initial=position.step, desc=task.name, disable=rank != 0, mininterval=2.0)
    train_sums: dict[str, float] = {}
    eval_sums: dict[str, float] = {}
    while position.step < total_steps:
        micro = epoch_batches(len(train_rows), stage.batch_size, rank, world, config.data.seed, position.epoch)
        micro = micro[: steps_per_epoch * stage.grad_accum]
        for indices in micro[position.micro_in_epoch:]:
            loss, sums = task.loss_and_sums(engine, task.collate([train_rows[i] for i in indices], pad_id), config)
            engine.backward(loss)
            engine.step()
            add_sums(train_sums, sums)
            position.micro_in_epoch += 1
            if position.micro_in_epoch % stage.grad_accum:
                continue
            position.step += 1
            _maybe_inject_failure(loop_config, position.step, rank)
            metrics = {}
            if position.step % stage.log_every == 0 or position.step == total_steps:
                metrics.update(task.train_metrics(all_reduce_sums(train_sums)), lr=engine.get_lr()[0], epoch=position.epoch)
                train_sums = {}
            done = position.step == total_steps
            if (stage.eval_every and position.step % stage.eval_every == 0 or done) and eval_rows:
                eval_sums = evaluate(engine, task, eval_rows, rank, world, stage.batch_size, pad_id, config)
                metrics.update(task.eval_metrics(eval_sums))
            if log is not None and metrics:
                log.log(position.step, metrics)
                bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if k in ("loss", "eval_loss", "eval_accuracy")})
            bar.update(1)
            epoch_done = position.micro_in_epoch == len(micro)
            if epoch_done:
                position.epoch, position.micro_in_epoch = position.epoch + 1, 0
            if stage.checkpoint_every and position.step % stage.checkpoint_every == 0 or done:
                save_checkpoint(engine, position, {"step": position.step, **metrics}, rank)
            if done or epoch_done:
                break
    bar.close()
    if not eval_sums and eval_rows:
        eval_sums = evaluate(engine, task, eval_rows, rank, world, stage.batch_size, pad_id, config)
    export_model(engine, task, config, loop_config, rank, eval_sums)
    if log is not None:
        log.close()
