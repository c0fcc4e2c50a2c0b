"""`rlhf-ray pipeline`: the stages in order, each feeding the next, skipping finished ones."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rlhf_ray.config import Config
from rlhf_ray.evaluation.launch import default_eval_dir, run_eval_policy, run_start_vs_ppo
from rlhf_ray.models.export import is_exported
from rlhf_ray.models.loading import load_tokenizer, require_safetensors
from rlhf_ray.models.optim import deepspeed_config
from rlhf_ray.models.provision import resolve_model
from rlhf_ray.ppo.prompts import load_prompt_set
from rlhf_ray.ppo.run import run_ppo
from rlhf_ray.run_log import read_metrics
from rlhf_ray.train.launch import prepare_rows, run_stage, stage_model_paths

STAGES = ("sft", "rm", "ppo")
EVAL_RESULTS = Path("eval") / "policy" / "eval.json"  # the eval stage's output, under the run folder


def run_pipeline(config: Config) -> dict[str, Path]:
    """SFT on the base model, the reward model initialised from the SFT model (as in InstructGPT),
    then PPO from the SFT policy against that reward model. A finished stage is skipped; an
    interrupted PPO stage resumes from its newest complete checkpoint."""
    run_dir = config.run.path.resolve()
    if config.run.store is not None:  # the stages finished so far
        config.run.store.fetch("pipeline")
    pending = [stage for stage in STAGES if not is_exported(run_dir / stage / "model")]
    check_inputs(config, pending[1:])  # the first pending stage checks its own inputs before it starts
    times_file = run_dir / "pipeline_seconds.json"
    seconds = json.loads(times_file.read_text()) if times_file.is_file() else {}
    start_stage = {
        "sft": lambda: run_stage(config, "sft"),
        "rm": lambda: run_stage(config, "rm", base_model=str(run_dir / "sft" / "model")),
        "ppo": lambda: run_ppo(config, resume=(run_dir / "ppo" / "checkpoints").exists()),
    }
    for stage in STAGES:
        folder = run_dir / stage / "model"
        if is_exported(folder):
            print(f"[pipeline] {stage}: finished output exists at {folder}; skipping (delete it to rerun)", flush=True)
            continue
        began = time.perf_counter()
        start_stage[stage]()
        seconds[stage] = round(time.perf_counter() - began, 1)
        save_seconds(config, times_file, seconds)
    if config.eval.enabled:
        if (run_dir / EVAL_RESULTS).is_file():
            print(f"[pipeline] eval: finished output exists at {run_dir / EVAL_RESULTS}; skipping", flush=True)
        else:
            began = time.perf_counter()
            run_eval_stage(config)
            seconds["eval"] = round(time.perf_counter() - began, 1)
            save_seconds(config, times_file, seconds)
    print(summary_table(run_dir, seconds), flush=True)
    return {stage: run_dir / stage / "model" for stage in STAGES}


def save_seconds(config: Config, times_file: Path, seconds: dict) -> None:
    """Each stage's wall time, kept in the run folder (and in its store) for the summary of a later rerun."""
    times_file.parent.mkdir(parents=True, exist_ok=True)
    times_file.write_text(json.dumps(seconds, indent=2) + "\n")
    if config.run.store is not None:
        config.run.store.push_paths(times_file)


def run_eval_stage(config: Config) -> dict:
    """`eval policy` of the starting policy and the PPO policy on the test split of `data.prompts`
    (prompts no stage trained on), judged by the run's reward model and `eval.extra_reward_models`."""
    request = run_start_vs_ppo(
        config, "test", config.eval.prompts_limit, config.eval.extra_reward_models, config.eval.samples_per_prompt
    )
    return run_eval_policy(config, request, default_eval_dir(config, "policy"))


def check_inputs(config: Config, stages: list[str]) -> None:
    """Read and tokenize the data of the later `stages` and check their models before the first stage
    starts, so a bad prompt row or a missing reward model fails the pipeline in seconds instead of
    after SFT and RM have trained. The stage tokenizes its data again when it runs.

    The SFT, RM and PPO stages all tokenize with the base model's tokenizer (the SFT model keeps it).
    """
    for judge in config.eval.extra_reward_models if config.eval.enabled else []:
        try:
            require_safetensors(resolve_model(judge))
        except (ValueError, FileNotFoundError) as err:
            raise ValueError(f"eval.extra_reward_models: {err}") from err
    if not stages:
        return
    _, tokenizer_path = stage_model_paths(config)
    tokenizer = load_tokenizer(tokenizer_path, config.model.trust_remote_code)
    for stage in ("sft", "rm"):
        if stage in stages:
            prepare_rows(config, stage, tokenizer)
            deepspeed_config(config, getattr(config, stage), config.resources.num_workers)
    if "ppo" in stages:
        load_prompt_set(config, tokenizer)
        if config.ppo.policy_model:
            require_safetensors(resolve_model(config.ppo.policy_model))
        if config.ppo.reward_model:
            require_safetensors(config.ppo.reward_model)


def summary_table(run_dir: Path, seconds: dict) -> str:
    """Final metrics per stage, PPO reward and KL first -> last, wall time, and where things are."""
    rows = {stage: read_metrics(run_dir / stage / "metrics.jsonl") for stage in STAGES}
    last = {stage: {k: v for row in r for k, v in row.items()} for stage, r in rows.items()}  # latest of each
    first_ppo = rows["ppo"][0] if rows["ppo"] else {}

    def fmt(value) -> str:
        return f"{value:.4g}" if isinstance(value, (int, float)) else "-"

    results = {
        "sft": f"eval loss {fmt(last['sft'].get('eval_loss'))}, perplexity {fmt(last['sft'].get('eval_perplexity'))}",
        "rm": f"eval accuracy {fmt(last['rm'].get('eval_accuracy'))}, margin {fmt(last['rm'].get('eval_margin'))}",
        "ppo": f"reward {fmt(first_ppo.get('reward_mean'))} -> {fmt(last['ppo'].get('reward_mean'))}, "
        f"KL {fmt(first_ppo.get('kl'))} -> {fmt(last['ppo'].get('kl'))}",
    }
    lines = ["", f"run {run_dir}", "stage | steps | result | wall time", "--- | --- | --- | ---"]
    for stage in STAGES:
        wall = f"{seconds[stage] / 60:.1f} min" if stage in seconds else "-"
        lines.append(f"{stage} | {last[stage].get('step', 0)} | {results[stage]} | {wall}")
    eval_file = run_dir / EVAL_RESULTS
    if eval_file.is_file():
        wall = f"{seconds['eval'] / 60:.1f} min" if "eval" in seconds else "-"
        lines.append(f"eval | {eval_line(json.loads(eval_file.read_text()))} | {wall}")
    lines.append("")
    lines += [
        f"{stage}: model {run_dir / stage / 'model'}, curves {run_dir / stage / 'curves.png'}" for stage in STAGES
    ]
    return "\n".join(lines)


def eval_line(results: dict) -> str:
    """The eval stage's row: prompts, then per reward model the PPO policy's reward against the start policy."""
    policies = results["policies"]
    start, final = policies.get("start"), policies.get("ppo")
    if start is None or final is None:
        return "- | no PPO policy to compare with"
    parts = []
    for rm, r in final["reward"].items():
        w = r["win_rate_vs_first"]
        parts.append(
            f"{rm}: reward {start['reward'][rm]['mean']:.4g} -> {r['mean']:.4g} "
            f"({r['gain_in_first_std']:+.2f} std), win-rate {w['rate']:.2f} [{w['low']:.2f}, {w['high']:.2f}]"
        )
    return f"- | {final['samples']} held-out samples, " + "; ".join(parts) + f"; KL {final['kl_to_first']:.3g}"
