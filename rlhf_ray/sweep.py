"""`rlhf-ray sweep`: Ray Tune trials of PPO over the KL coefficient and the learning rate.

Each trial is a function trainable that runs PPO with its own four actors inside the trial's
placement group, reports every iteration to Tune, and hands Tune its checkpoints so a trial
(or the whole sweep, via `Tuner.restore`) resumes where it stopped. With `sweep.rank_by: heldout`
a finished trial then evaluates its policy against the start on the eval split of the prompts
(prompts PPO never trained on) and reports the held-out gain, KL and win-rate as its last result;
the best trial is the one with the largest held-out gain within `sweep.kl_budget`.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

from rlhf_ray import ray_session
from rlhf_ray.config import Config, config_from_dict, require_writable, save_config
from rlhf_ray.evaluation.launch import default_eval_dir, run_eval_policy, run_start_vs_ppo
from rlhf_ray.ppo.launch import role_requests
from rlhf_ray.ppo.run import run_ppo
from rlhf_ray.run_log import read_metrics
from rlhf_ray.typed_yaml import to_dict


def with_absolute_paths(config: Config) -> Config:
    """Trials run in their own working folders: pin every relative local path to the sweep's folder."""
    data = to_dict(config)

    def pin(value):
        return str(Path(value).resolve()) if value and Path(value).exists() else value

    for name in ("sft", "preference", "prompts"):
        data["data"][name]["path"] = pin(data["data"][name]["path"])
    data["deepspeed"]["config_file"] = pin(data["deepspeed"]["config_file"])
    data["model"]["name_or_path"] = pin(data["model"]["name_or_path"])
    data["model"]["tokenizer"] = pin(data["model"]["tokenizer"])
    data["ppo"]["policy_model"] = pin(data["ppo"]["policy_model"])
    data["ppo"]["reward_model"] = pin(data["ppo"]["reward_model"])
    for source in data["ppo"]["rewards"]:  # a reward function given as path/to/file.py:function
        module, _, function = (source["function"] or "").rpartition(":")
        if module.endswith(".py"):
            source["function"] = f"{pin(module)}:{function}"
    data["run"]["output_dir"] = str(Path(data["run"]["output_dir"]).resolve())
    return config_from_dict(data)


def trial_config(base: dict, kl_coef: float, lr: float, trial_name: str) -> Config:
    """The trial's config. Its actors run in the trial's placement group, which spreads them if asked
    (`trial_resources`); a SPREAD strategy of their own would take them out of it."""
    data = {**base, "ppo": {**base["ppo"], "kl_coef": kl_coef, "lr": lr}, "run": {**base["run"], "name": trial_name}}
    data["resources"] = {**base.get("resources", {}), "spread_roles": False}
    return config_from_dict(data)


def run_trial(params: dict) -> None:
    """Tune function trainable: one PPO run with this trial's kl_coef and lr."""
    from ray import tune

    trial_name = f"{params['base']['run']['name']}-{tune.get_context().get_trial_id()}"
    config = trial_config(params["base"], params["kl_coef"], params["lr"], trial_name)
    checkpoint = tune.get_checkpoint()

    def report(iteration: int, metrics: dict, saved: Path | None) -> None:
        row = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        tune.report(row, checkpoint=tune.Checkpoint.from_directory(str(saved)) if saved else None)

    if checkpoint is None:
        shutil.rmtree(config.run.path.resolve() / "ppo", ignore_errors=True)  # a restart before any checkpoint
        result = run_ppo(config, on_iteration=report)
    else:
        with checkpoint.as_directory() as folder:
            result = run_ppo(config, checkpoint=Path(folder), on_iteration=report)
    if config.sweep.rank_by == "heldout":
        last = result.final_metrics or (read_metrics(result.output_dir / "metrics.jsonl") or [{}])[-1]
        tune.report({**{k: v for k, v in last.items() if isinstance(v, (int, float))}, **heldout_metrics(config)})


HELDOUT_KEYS = ("heldout_gain", "heldout_kl", "heldout_win_rate")


def heldout_metrics(config: Config) -> dict:
    """The trial's PPO policy against its start on `sweep.eval_prompts` prompts of the eval split, by the run's RM."""
    request = run_start_vs_ppo(config, "eval", config.sweep.eval_prompts)
    if len(request.policies) < 2:
        raise RuntimeError(f"the trial exported no PPO model under {config.run.path / 'ppo'} to evaluate")
    return heldout_row(run_eval_policy(config, request, default_eval_dir(config, "heldout")))


def heldout_row(results: dict) -> dict:
    """heldout_gain (reward gain in the start's reward std), heldout_kl (nats), heldout_win_rate, from `eval policy`."""
    ppo = results["policies"]["ppo"]
    (reward,) = ppo["reward"].values()
    return dict(
        zip(HELDOUT_KEYS, (reward["gain_in_first_std"], ppo["kl_to_first"], reward["win_rate_vs_first"]["rate"]))
    )


def best_trial(rows: list[dict], kl_budget: float) -> dict | None:
    """The trial with the largest held-out gain among those within the KL budget; when none is within it,
    the one with the smallest held-out KL. Trials without a held-out result (failed, or stopped early
    by the scheduler) are never picked. None when no trial has one."""
    evaluated = [row for row in rows if not row["error"] and row.get("heldout_gain") is not None]
    within = [row for row in evaluated if row["heldout_kl"] <= kl_budget]
    if within:
        return max(within, key=lambda row: row["heldout_gain"])
    return min(evaluated, key=lambda row: row["heldout_kl"], default=None)


def trial_resources(config: Config):
    """One bundle for the trial's driver and one per actor that takes resources (CPUs, GPUs, custom resources),
    packed on as few nodes as possible, or spread with `resources.spread_roles`."""
    from ray import tune

    strategy = "SPREAD" if config.resources.spread_roles else "PACK"
    bundles = [{"CPU": 0.1}, *(request.needs() for request in role_requests(config))]
    return tune.PlacementGroupFactory(bundles, strategy=strategy)


def build_tuner(config: Config, resume: bool):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    sweep = config.sweep
    storage = config.run.path.resolve()
    experiment = storage / "sweep"
    trainable = tune.with_resources(run_trial, trial_resources(config))
    if resume:
        if not tune.Tuner.can_restore(str(experiment)):
            raise FileNotFoundError(f"no sweep to resume at {experiment}")
        print(f"[sweep] resuming {experiment}", flush=True)
        return tune.Tuner.restore(str(experiment), trainable=trainable, resume_errored=True)
    if experiment.exists():
        raise FileExistsError(
            f"{experiment} already holds a sweep; pass --resume to continue it or use another run.name"
        )
    pick = tune.grid_search if sweep.search == "grid" else tune.choice
    # The held-out result comes one report after the last iteration: ASHA must not stop a trial before it.
    last_report = config.ppo.iterations + (sweep.rank_by == "heldout")
    scheduler = (
        ASHAScheduler(max_t=last_report, grace_period=min(2, config.ppo.iterations))
        if sweep.scheduler == "asha"
        else None
    )
    return tune.Tuner(
        trainable,
        param_space={"base": to_dict(config), "kl_coef": pick(sweep.kl_coefs), "lr": pick(sweep.lrs)},
        tune_config=tune.TuneConfig(
            metric=sweep.metric,
            mode=sweep.mode,
            scheduler=scheduler,
            num_samples=sweep.num_samples,
            max_concurrent_trials=sweep.max_concurrent_trials,
        ),
        run_config=tune.RunConfig(name="sweep", storage_path=str(storage)),
    )


def write_results(config: Config, results) -> tuple[Path, Path, Path]:
    """sweep_results.csv (one row per trial), best_config.yaml (ready for `rlhf-ray ppo`), sweep.png."""
    out = config.run.path.resolve()
    rows = []
    for result in results:
        metrics = result.metrics or {}
        rows.append(
            {
                "trial": result.path.rsplit("/", 1)[-1],
                "kl_coef": result.config["kl_coef"],
                "lr": result.config["lr"],
                # the held-out result is one report past the last iteration
                "iterations": min(metrics.get("training_iteration", 0), config.ppo.iterations),
                "reward_mean": metrics.get("reward_mean"),
                "kl": metrics.get("kl"),
                **{key: metrics.get(key) for key in HELDOUT_KEYS},
                "error": str(result.error).strip().splitlines()[-1] if result.error else "",
            }
        )
    table = out / "sweep_results.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    if config.sweep.rank_by == "heldout":
        best = best_trial(rows, config.sweep.kl_budget)
        if best is None:
            raise RuntimeError(f"no trial finished with a held-out result; see {table}")
        if best["heldout_kl"] > config.sweep.kl_budget:
            print(
                f"[sweep] no trial stayed within sweep.kl_budget {config.sweep.kl_budget:g} nats; "
                f"picked the one closest to it (held-out KL {best['heldout_kl']:.3g})",
                flush=True,
            )
        kl_coef, lr = best["kl_coef"], best["lr"]
        print(
            f"[sweep] best by held-out gain: kl_coef {kl_coef:g}, lr {lr:g}: gain {best['heldout_gain']:+.3f} std, "
            f"KL {best['heldout_kl']:.3g}, win-rate {best['heldout_win_rate']:.3f}",
            flush=True,
        )
    else:
        chosen = results.get_best_result(metric=config.sweep.metric, mode=config.sweep.mode)
        kl_coef, lr = chosen.config["kl_coef"], chosen.config["lr"]
    best_config = trial_config(to_dict(config), kl_coef, lr, f"{config.run.name}-best")
    best_path = save_config(best_config, out, "best_config.yaml")
    return table, best_path, _plot(rows, out / "sweep.png")


def _plot(rows: list[dict], png: Path) -> Path:
    """Reward against KL per trial: held-out gain and KL where trials have them, else the last iteration's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heldout = any(row["heldout_gain"] is not None for row in rows)
    x_key, y_key = ("heldout_kl", "heldout_gain") if heldout else ("kl", "reward_mean")
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for row in rows:
        if row[x_key] is not None and row[y_key] is not None:
            ax.scatter(row[x_key], row[y_key])
            ax.annotate(f"kl_coef={row['kl_coef']:g}, lr={row['lr']:g}", (row[x_key], row[y_key]), fontsize=7)
    if heldout:
        ax.set_xlabel("KL to the start policy on held-out prompts (nats)")
        ax.set_ylabel("held-out reward gain (start policy's reward std)")
        ax.set_title("sweep: held-out gain vs KL per trial")
    else:
        ax.set_xlabel("KL to reference (final iteration)")
        ax.set_ylabel("reward mean (final iteration)")
        ax.set_title("sweep: reward vs KL per trial")
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png


def run_sweep(config: Config, resume: bool = False) -> tuple[Path, Path, Path]:
    if config.sweep.rank_by == "heldout" and not config.ppo.uses_reward_model:
        raise ValueError(
            "sweep.rank_by=heldout judges trials with the run's reward model, but ppo.rewards has none (kind model); "
            "use sweep.rank_by=metric"
        )
    config = with_absolute_paths(config)
    require_writable(config.run.path)
    print(f"[sweep] Ray: {ray_session.connect(config.resources)}", flush=True)
    save_config(config, config.run.path.resolve())
    results = build_tuner(config, resume).fit()
    table, best, png = write_results(config, results)
    print(f"[sweep] results {table}\n[sweep] best config {best}\n[sweep] plot {png}", flush=True)
    return table, best, png
