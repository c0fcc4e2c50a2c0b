"""Driver side of the SFT and RM jobs: load and tokenize data, launch the Ray Train TorchTrainer."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rlhf_ray import ray_session
from rlhf_ray.checkpoints import CheckpointError
from rlhf_ray.config import Config, ResourcesConfig, require_writable, save_config
from rlhf_ray.formats import splits
from rlhf_ray.formats.load import load_preference_pairs, load_sft_examples
from rlhf_ray.models.checks import check_tokenizer
from rlhf_ray.models.loading import load_tokenizer, require_safetensors
from rlhf_ray.models.optim import deepspeed_config
from rlhf_ray.models.precision import resolve_precision
from rlhf_ray.models.provision import resolve_model
from rlhf_ray.placement import Request
from rlhf_ray.run_log import plot_curves, read_metrics
from rlhf_ray.storage import ray_storage
from rlhf_ray.tokenization import LengthReport
from rlhf_ray.train import batches
from rlhf_ray.typed_yaml import to_dict


@dataclass
class StageResult:
    output_dir: Path
    model_dir: Path
    metrics: dict  # the last metrics reported


def prepare_rows(config: Config, stage: str, tokenizer) -> tuple[list, list, str]:
    """Tokenized train and eval rows, and a summary of what was read, skipped or truncated.

    Rows are split by their prompt (`formats/splits.py`): the eval rows are the `eval` split, the training
    rows the `train` split (narrowed to `data.train_part`); `test` prompts are never read for training.
    """
    data = config.data
    if stage == "sft":
        source, load, tokenize = data.sft, load_sft_examples, batches.tokenize_sft
    else:
        source, load, tokenize = data.preference, load_preference_pairs, batches.tokenize_pairs
    loaded = load(source.path, source.format, on_bad_row=data.on_bad_row, split=source.split, limit=source.limit)
    parts = splits.partition(
        loaded.examples,
        seed=data.seed,
        eval_fraction=data.eval_fraction,
        test_fraction=data.test_fraction,
        train_part=data.train_part,
    )
    lengths = LengthReport(data.overlong)  # every row is checked, also those this stage does not use
    train, held_out, _, _ = (
        tokenize(parts[name], tokenizer, data.max_length, data.overlong, lengths)
        for name in ("train", "eval", "test", "other")
    )
    unused = f"{len(parts['test'])} test" + (
        f" + {len(parts['other'])} in the other training half" if data.train_part != "all" else ""
    )
    summary = (
        f"{source.path} ({loaded.format}): {loaded.rows_read} rows read, {len(loaded.examples)} examples; "
        f"bad rows: {loaded.problems.summary()}; lengths: {lengths.summary()}; "
        f"{len(train.rows)} train / {len(held_out.rows)} eval, {unused} not used (split by prompt)"
    )
    check_enough_rows(len(train.rows), config, stage, summary)
    if data.eval_fraction > 0 and not held_out.rows:
        raise ValueError(
            f"{stage}: no rows fell in the eval split (data.eval_fraction {data.eval_fraction} of "
            f"{len(loaded.examples)} examples, chosen by prompt); raise data.eval_fraction. Data: {summary}"
        )
    return train.rows, held_out.rows, summary


def check_enough_rows(n_train: int, config: Config, stage: str, summary: str) -> None:
    """One optimizer step takes batch_size x grad_accum rows on each worker; fewer is an error now, not in a worker."""
    stage_config, workers = getattr(config, stage), config.resources.num_workers
    needed = stage_config.batch_size * stage_config.grad_accum * workers
    if n_train < needed:
        raise ValueError(
            f"{stage}: {n_train} training rows are fewer than one optimizer step needs "
            f"({stage}.batch_size {stage_config.batch_size} x {stage}.grad_accum {stage_config.grad_accum} "
            f"x resources.num_workers {workers} = {needed}); data: {summary}"
        )


def stage_model_paths(config: Config, base_model: str | None = None) -> tuple[Path, Path]:
    """The model folder a stage starts from (safetensors weights required) and its tokenizer folder."""
    model_path = require_safetensors(resolve_model(base_model or config.model.name_or_path)).resolve()
    tokenizer_path = resolve_model(config.model.tokenizer).resolve() if config.model.tokenizer else model_path
    check_tokenizer(tokenizer_path)
    return model_path, tokenizer_path


class NonFiniteTraining(RuntimeError):
    """An SFT or RM job stopped on NaN/inf losses or weights; nothing was exported."""


def run_stage(
    config: Config, stage: str, *, base_model: str | None = None, after_step: Callable[[int, int], None] | None = None
) -> StageResult:
    """Run the `sft` or `rm` job to completion (resuming a same-named run) and export its model.

    `after_step(step, rank)`, when given, runs in every worker after each optimizer step.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from rlhf_ray.train.worker import METRICS, STOPPED, train_fn_per_worker, usable_checkpoint

    stage_config = getattr(config, stage)
    out = (config.run.path / stage).resolve()
    require_writable(out)
    store = config.run.store
    if store is not None:  # the run so far (checkpoints to resume, the models a stage starts from)
        store.fetch(stage, stage)
    # Every input is read and checked before anything is written or Ray starts.
    checkpoints = out / "ray" / stage  # RunConfig's storage_path / name
    resume_from = usable_checkpoint(checkpoints, registered_any(checkpoints), config.resources.num_workers, rank=0)
    model_path, tokenizer_path = stage_model_paths(config, base_model)
    tokenizer = load_tokenizer(tokenizer_path, config.model.trust_remote_code)
    train, held_out, summary = prepare_rows(config, stage, tokenizer)
    print(f"[{stage}] data: {summary}", flush=True)
    if resume_from is not None:
        print(f"[{stage}] resuming from {resume_from}", flush=True)
    ds = deepspeed_config(config, stage_config, config.resources.num_workers)
    if not config.resources.use_gpu:
        chosen = resolve_precision(config.model.precision).why
        print(f"[{stage}] precision on this node's CPU: {chosen} (each worker prints its own)", flush=True)
    print(f"[{stage}] Ray: {ray_session.connect(config.resources)}; outputs in {out}", flush=True)
    ray_session.require_fits(stage, worker_requests(stage, config.resources))
    ray_session.require_shared_output(config.run, out)
    save_config(config, out)
    (out / "deepspeed.json").write_text(json.dumps(ds, indent=2) + "\n")
    if store is not None:
        store.push_paths(out / "config.yaml", out / "deepspeed.json")

    loop_config = {
        "config": _as_dict(config),
        "stage": stage,
        "deepspeed": ds,
        "output_dir": str(out),
        "checkpoints": str(checkpoints),
        "model_path": str(model_path),
        "tokenizer_path": str(tokenizer_path),
        "pad_id": tokenizer.pad_token_id,
        "data": ray.put({"train": train, "eval": held_out}),
        "after_step": after_step,
    }
    resources = config.resources
    trainer = TorchTrainer(
        _resolve_data_ref_then(train_fn_per_worker),
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=resources.num_workers,
            use_gpu=resources.use_gpu,
            resources_per_worker={"CPU": resources.cpus_per_worker, **resources.role_resources.train_worker},
            placement_strategy="SPREAD" if resources.spread_roles else "PACK",
        ),
        torch_config=TorchConfig(backend="nccl" if resources.use_gpu else "gloo"),
        run_config=RunConfig(
            name=stage,
            **ray_storage(config.run.store, out / "ray"),
            checkpoint_config=CheckpointConfig(num_to_keep=stage_config.num_to_keep),
            failure_config=FailureConfig(max_failures=stage_config.max_failures),
        ),
    )
    stopped = out / STOPPED
    stopped.unlink(missing_ok=True)  # (a reason left by an earlier attempt of this run)
    if store is not None:
        store.delete(f"{stage}/{STOPPED}")
    result = ray_session.run_interruptibly(trainer.fit)
    if store is not None:  # what rank 0 wrote on its node
        store.pull_paths(*(out / name for name in (METRICS, "tensorboard", STOPPED, "model", "adapter")))
    if stopped.is_file():
        why = json.loads(stopped.read_text())
        raise (CheckpointError if why.get("kind") == "checkpoint" else NonFiniteTraining)(why["reason"])
    png = plot_curves(out / "metrics.jsonl", out / "curves.png", f"{config.run.name}: {stage}")
    if store is not None and png:
        store.push_paths(png)
    print(f"[{stage}] done: model {out / 'model'}" + (f", curves {png}" if png else ""), flush=True)
    evals = [row for row in read_metrics(out / "metrics.jsonl") if any(k.startswith("eval_") for k in row)]
    if evals:
        print(
            f"[{stage}] held-out eval at step {evals[-1]['step']}: "
            + ", ".join(f"{k} {v:.4g}" for k, v in evals[-1].items() if k.startswith("eval_"))
            + (f" (step 0: {evals[0]['eval_accuracy']:.4g})" if "eval_accuracy" in evals[0] and len(evals) > 1 else ""),
            flush=True,
        )
    return StageResult(out, out / "model", dict(result.metrics or {}))


def registered_any(checkpoints: Path) -> bool:
    """Whether Ray Train's snapshot in a stage's checkpoint folder lists a checkpoint (it then hands the workers one,
    and a run with none complete refuses to start over). An unreadable snapshot counts as listing one."""
    snapshot = checkpoints / "checkpoint_manager_snapshot.json"  # Ray Train's file name
    if not snapshot.is_file():
        return False
    try:
        return bool(json.loads(snapshot.read_text()).get("checkpoint_results", True))
    except (OSError, ValueError, AttributeError):
        return True


def worker_requests(stage: str, resources: ResourcesConfig) -> list[Request]:
    """What each Ray Train worker of the stage holds."""
    settings = "resources.cpus_per_worker" + (", resources.use_gpu" if resources.use_gpu else "")
    settings += ", resources.role_resources.train_worker" if resources.role_resources.train_worker else ""
    each = {"CPU": resources.cpus_per_worker, "GPU": 1.0 if resources.use_gpu else 0.0}
    each.update(resources.role_resources.train_worker)
    count = resources.num_workers
    return [Request(f"{stage} worker {i + 1} of {count}", each, settings) for i in range(count)]


def _as_dict(config: Config) -> dict:
    return to_dict(config)


def _resolve_data_ref_then(fn):
    """Workers receive the data as an object ref inside the config; fetch it before `fn` runs."""

    def train_fn(loop_config: dict) -> None:
        import ray

        fn({**loop_config, "data": ray.get(loop_config["data"])})

    return train_fn
