"""`rlhf-ray ppo`: set up the actors, run the iterations, checkpoint, resume, export."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from rlhf_ray.config import Config, save_config
from rlhf_ray.ppo.launch import ModelPaths

CHECKPOINT_DONE = "driver_state.json"  # written last: a checkpoint folder without it is incomplete
CHECKPOINTS_KEPT = 2
PLOTTED = ["reward_mean", "reward_std", "kl", "entropy", "response_length", "finished_fraction", "value_loss",
           "explained_variance", "clip_fraction", "approx_kl", "generated_tokens_per_s", "seconds_iteration"]


@dataclass
class PPOResult:
    output_dir: Path
    iterations: int
    final_metrics: dict


def resolve_model_paths(config: Config) -> ModelPaths:
    from rlhf_ray.models.provision import resolve_model
    from rlhf_ray.train.export import is_exported

    run = config.run.path.resolve()
    if config.ppo.policy_model:
        policy = resolve_model(config.ppo.policy_model)
    elif is_exported(run / "sft" / "model"):
        policy = run / "sft" / "model"
    else:
        policy = resolve_model(config.model.name_or_path)
    reward = Path(config.ppo.reward_model) if config.ppo.reward_model else run / "rm" / "model"
    if not (reward / "config.json").is_file():
        raise FileNotFoundError(f"reward model not found at {reward}: run `rlhf-ray rm` first or set ppo.reward_model")
    return ModelPaths(policy.resolve(), reward.resolve())


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint; incomplete ones (no driver_state.json) are reported and skipped."""
    if not folder.is_dir():
        return None
    for candidate in sorted(folder.glob("iter_*"), reverse=True):
        if (candidate / CHECKPOINT_DONE).is_file():
            return candidate
        print(f"[ppo] skipping incomplete checkpoint {candidate}", flush=True)
    return None


def save_checkpoint(folder: Path, actors, state: dict) -> Path:
    """Learner state, then the driver state last, in a temporary folder renamed into place."""
    import ray

    target = folder / f"iter_{state['iteration']:06d}"
    staging = folder / f".tmp-{target.name}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    ray.get(actors.learner.save.remote(str(staging)))
    (staging / CHECKPOINT_DONE).write_text(json.dumps(state, indent=2) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    for old in sorted(folder.glob("iter_*"))[:-CHECKPOINTS_KEPT]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _make_kl_controller(config: Config, value: float):
    from rlhf_ray.algo.ppo import AdaptiveKLController, FixedKLController

    ppo = config.ppo
    if ppo.adaptive_kl:
        return AdaptiveKLController(value, ppo.target_kl, ppo.kl_horizon)
    return FixedKLController(value)


def _write_samples(path: Path, iteration: int, rollouts, experience, prompts, tokenizer, limit: int = 4) -> None:
    with open(path, "a") as handle:
        for row, rollout in enumerate(rollouts[:limit]):
            handle.write(json.dumps({
                "iteration": iteration, "prompt": tokenizer.decode(prompts[rollout.prompt_index]),
                "response": tokenizer.decode(rollout.token_ids, skip_special_tokens=True),
                "score": float(experience.scores[row])}) + "\n")


def run_ppo(config: Config, resume: bool = False, *, checkpoint: Path | None = None, on_iteration=None) -> PPOResult:
    """Run PPO to `ppo.iterations`. `resume` continues from this run's newest complete checkpoint;
    `checkpoint` names one explicitly (Tune trials). `on_iteration(iteration, metrics, saved_checkpoint)`
    is called after every iteration (saved_checkpoint is None when none was written)."""
    from rlhf_ray.models.loading import load_tokenizer
    from rlhf_ray.ppo.launch import launch_actors, stop_actors
    from rlhf_ray.ppo.prompts import load_prompt_set
    from rlhf_ray.ray_session import connect
    from rlhf_ray.run_log import plot_curves

    out = (config.run.path / "ppo").resolve()
    paths = resolve_model_paths(config)
    tokenizer = load_tokenizer(paths.policy, config.model.trust_remote_code)
    prompts = load_prompt_set(config, tokenizer)
    print(f"[ppo] prompts: {prompts.summary}", flush=True)
    print(f"[ppo] policy {paths.policy}; reward model {paths.reward}", flush=True)
    if checkpoint is None and resume:
        checkpoint = latest_checkpoint(out / "checkpoints")
        if checkpoint is None:
            print(f"[ppo] --resume: no complete checkpoint under {out / 'checkpoints'}; starting from iteration 0", flush=True)
    elif checkpoint is None and (out / "checkpoints").exists():
        raise FileExistsError(f"{out} already holds a PPO run; pass --resume to continue it or use another run.name")
    save_config(config, out)
    print(f"[ppo] Ray: {connect(config.resources)}; outputs in {out}", flush=True)

    actors = launch_actors(config, paths, tokenizer, max_model_len=config.data.max_prompt_length + config.ppo.max_new_tokens)
    try:
        state, metrics = _run_iterations(config, actors, prompts, tokenizer, out, checkpoint, on_iteration)
        _export_final(actors, out, paths)
    finally:
        stop_actors(actors)
    png = plot_curves(out / "metrics.jsonl", out / "curves.png", f"{config.run.name}: ppo", PLOTTED)
    print(f"[ppo] done: model {out / 'model'}, adapter {out / 'adapter'}" + (f", curves {png}" if png else ""), flush=True)
    return PPOResult(out, state["iteration"], metrics)


def _run_iterations(config: Config, actors, prompts, tokenizer, out: Path, checkpoint: Path | None,
                    on_iteration=None) -> tuple[dict, dict]:
    """Restore from `checkpoint` if given, then iterate: collect, update, log, sample, checkpoint."""
    import ray
    from tqdm import tqdm

    from actors.rollout_generator import SamplingSpec
    from rlhf_ray import dashboard_metrics
    from rlhf_ray.algo.ppo import explained_variance
    from rlhf_ray.ppo.driver import ppo_step
    from rlhf_ray.run_log import MetricsLog, trim_jsonl

    ppo, seed = config.ppo, config.run.seed
    state = {"iteration": 0, "kl_coef": ppo.kl_coef, "samples_seen": 0}
    if checkpoint is not None:
        state = json.loads((checkpoint / CHECKPOINT_DONE).read_text())
        ray.get(actors.learner.load.remote(str(checkpoint)))
        trim_jsonl(out / "samples.jsonl", "iteration", state["iteration"])
        print(f"[ppo] resumed from {checkpoint} (iteration {state['iteration']})", flush=True)
    adapter = ray.get(actors.learner.export_adapter.remote())
    ray.get([g.load_adapter.remote(adapter.version, adapter) for g in actors.generators])
    kl_controller = _make_kl_controller(config, state["kl_coef"])
    log = MetricsLog(out, resume_step=state["iteration"])
    bar = tqdm(total=ppo.iterations, initial=state["iteration"], desc="ppo")
    metrics: dict = {}
    for iteration in range(state["iteration"], ppo.iterations):
        indices = prompts.batch(iteration, ppo.rollout_batch_size, seed)
        sampling = SamplingSpec(ppo.max_new_tokens, ppo.temperature, ppo.top_p, ppo.responses_per_prompt,
                                seed=seed * 1_000 + iteration)
        batch_prompts = [prompts.token_ids[i] for i in indices]
        experience, metrics, rollouts = ppo_step(actors, batch_prompts, sampling, kl_controller.value, ppo,
                                                 tokenizer.pad_token_id)
        metrics["explained_variance"] = float(explained_variance(experience.values, experience.returns,
                                                                 experience.batch.response_mask))
        kl_controller.update(metrics["kl"], len(rollouts))
        state = {"iteration": iteration + 1, "kl_coef": kl_controller.value,
                 "samples_seen": state["samples_seen"] + len(rollouts), "prompt_ids": indices}
        metrics["samples_seen"] = state["samples_seen"]
        log.log(iteration + 1, metrics)
        dashboard_metrics.publish(metrics, config.run.name, "ppo")
        bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", kl=f"{metrics['kl']:.3f}")
        bar.update(1)
        if ppo.sample_every and (iteration + 1) % ppo.sample_every == 0:
            _write_samples(out / "samples.jsonl", iteration + 1, rollouts, experience, batch_prompts, tokenizer)
        saved = None
        if ppo.checkpoint_every and (iteration + 1) % ppo.checkpoint_every == 0 or iteration + 1 == ppo.iterations:
            saved = save_checkpoint(out / "checkpoints", actors, state)
        if on_iteration is not None:
            on_iteration(iteration + 1, metrics, saved)
    bar.close()
    log.close()
    return state, metrics


def _export_final(actors, out: Path, paths: ModelPaths) -> None:
    import ray

    from rlhf_ray.train.export import COMPLETE_MARKER

    staging = out / ".export-tmp"
    shutil.rmtree(staging, ignore_errors=True)
    ray.get(actors.learner.export_merged.remote(str(staging), str(paths.policy)))
    for name in ("model", "adapter"):
        shutil.rmtree(out / name, ignore_errors=True)
        os.replace(staging / name, out / name)
    shutil.rmtree(staging, ignore_errors=True)
    summary = {"stage": "ppo", "lora": True, "base_model": str(paths.policy), "reward_model": str(paths.reward)}
    (out / "model" / COMPLETE_MARKER).write_text(json.dumps(summary, indent=2) + "\n")
