"""`rlhf-ray pipeline`: the stages in order, each feeding the next, skipping finished ones."""

from __future__ import annotations

from pathlib import Path

from rlhf_ray.config import Config
from rlhf_ray.run_log import read_metrics
from rlhf_ray.train.export import is_exported

SUMMARY_KEYS = {"sft": ("eval_loss", "eval_perplexity"), "rm": ("eval_accuracy", "eval_margin"),
                "ppo": ("reward_mean", "kl")}


def run_pipeline(config: Config) -> dict[str, Path]:
    """SFT on the base model, the reward model initialised from the SFT model (as in InstructGPT),
    then PPO from the SFT policy against that reward model. A finished stage is skipped; an
    interrupted PPO stage resumes from its newest complete checkpoint."""
    from rlhf_ray.ppo.run import run_ppo
    from rlhf_ray.train.launch import run_stage

    models: dict[str, Path] = {}
    bases = {"sft": None, "rm": lambda: str(models["sft"])}
    for stage, base in bases.items():
        folder = (config.run.path / stage / "model").resolve()
        if is_exported(folder):
            print(f"[pipeline] {stage}: finished output exists at {folder}; skipping (delete it to rerun)", flush=True)
        else:
            run_stage(config, stage, base_model=base() if base else None)
        models[stage] = folder
    ppo_dir = (config.run.path / "ppo").resolve()
    if is_exported(ppo_dir / "model"):
        print(f"[pipeline] ppo: finished output exists at {ppo_dir / 'model'}; skipping (delete it to rerun)", flush=True)
    else:
        run_ppo(config, resume=(ppo_dir / "checkpoints").exists())
    models["ppo"] = ppo_dir / "model"
    print(summary_table(config), flush=True)
    return models


def summary_table(config: Config) -> str:
    lines = ["", f"run {config.run.name} ({config.run.path.resolve()})", "stage | steps | final metrics", "--- | --- | ---"]
    for stage, keys in SUMMARY_KEYS.items():
        rows = read_metrics(config.run.path / stage / "metrics.jsonl")
        last = {k: v for row in rows for k, v in row.items()}  # latest value of each metric
        shown = ", ".join(f"{k} {last[k]:.4g}" for k in keys if k in last) or "no metrics"
        lines.append(f"{stage} | {last.get('step', 0)} | {shown}")
    return "\n".join(lines)
