"""`rlhf-ray sweep`: Ray Tune trials of PPO over the KL coefficient and the learning rate.

The trials are listed before Tune starts (`trial_specs`: the grid, or seeded random draws), each with a
name that fixes its run folder. A trial runs PPO with its own four actors inside the trial's placement
group and reports every iteration to Tune. `--resume` starts a new Tune experiment over the same list:
a trial whose run finished reports its logged result again, one that stopped resumes from its own newest
complete PPO checkpoint (read as any PPO resume is, never unpickled), and one that never started starts.
Tune's own experiment state (pickles) is never restored. With `sweep.rank_by: heldout` a finished trial
then evaluates its policy against the start on the eval split of the prompts (prompts PPO never trained
on) and reports the held-out gain, KL and win-rate as its last result; the best trial is the one with
the largest held-out gain within `sweep.kl_budget`.
"""

from __future__ import annotations

import csv
import json
import random
import shutil
from pathlib import Path

from rlhf_ray import ray_session
from rlhf_ray.config import Config, SweepConfig, config_from_dict, require_writable, save_config
from rlhf_ray.evaluation.launch import default_eval_dir, run_eval_policy, run_start_vs_ppo
from rlhf_ray.models.export import is_exported
from rlhf_ray.ppo.launch import role_requests
from rlhf_ray.ppo.run import run_ppo
from rlhf_ray.run_log import read_metrics
from rlhf_ray.storage import ray_storage
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
    if config.run.store is None:
        data["run"]["output_dir"] = str(Path(data["run"]["output_dir"]).resolve())
    data["run"]["local_copy_dir"] = str(Path(data["run"]["local_copy_dir"]).expanduser().resolve())
    return config_from_dict(data)


def trial_config(base: dict, kl_coef: float, lr: float, trial_name: str) -> Config:
    """The trial's config. Its actors run in the trial's placement group, which spreads them if asked
    (`trial_resources`); a SPREAD strategy of their own would take them out of it."""
    data = {**base, "ppo": {**base["ppo"], "kl_coef": kl_coef, "lr": lr}, "run": {**base["run"], "name": trial_name}}
    data["resources"] = {**base.get("resources", {}), "spread_roles": False}
    return config_from_dict(data)


def trial_specs(sweep: SweepConfig, seed: int) -> list[dict]:
    """Every trial of the sweep, named by its place and values: the grid `num_samples` times over, or
    `num_samples` draws seeded by `seed`. The same config always lists the same trials."""
    if sweep.search == "grid":
        values = [(kl, lr) for _ in range(sweep.num_samples) for kl in sweep.kl_coefs for lr in sweep.lrs]
    else:
        draw = random.Random(seed)
        values = [(draw.choice(sweep.kl_coefs), draw.choice(sweep.lrs)) for _ in range(sweep.num_samples)]
    return [{"name": f"t{i:02d}-kl{kl:g}-lr{lr:g}", "kl_coef": kl, "lr": lr} for i, (kl, lr) in enumerate(values)]


def run_trial(params: dict) -> None:
    """Tune function trainable: one PPO run with this trial's kl_coef and lr, resumed from its own run folder."""
    from ray import tune

    spec = params["trial"]
    config = trial_config(
        params["base"], spec["kl_coef"], spec["lr"], f"{params['base']['run']['name']}-{spec['name']}"
    )
    out = config.run.path.resolve() / "ppo"
    if config.run.store is not None:  # the trial's run so far (an interrupted sweep's checkpoints, its result)
        config.run.store.fetch("sweep")
    reported = []

    def report(iteration: int, metrics: dict, saved: Path | None) -> None:
        reported.append(iteration)
        tune.report({**{k: v for k, v in metrics.items() if isinstance(v, (int, float))}, "iteration": iteration})

    def last_logged() -> dict:
        last = (read_metrics(out / "metrics.jsonl") or [{}])[-1]
        numbers = {k: v for k, v in last.items() if isinstance(v, (int, float)) and k != "step"}
        return {**numbers, "iteration": last.get("step", 0)}

    if is_exported(out / "model"):  # finished before the sweep was interrupted
        print(f"[sweep] {config.run.name}: finished earlier; reporting its logged result", flush=True)
    else:
        if not (out / "checkpoints").is_dir():
            shutil.rmtree(out, ignore_errors=True)  # a trial stopped before its first checkpoint starts afresh
        run_ppo(config, resume=(out / "checkpoints").is_dir(), on_iteration=report)
    if config.sweep.rank_by == "heldout":
        # one report past the last iteration (ASHA's max_t)
        tune.report({**last_logged(), **heldout_metrics(config), "iteration": config.ppo.iterations + 1})
    elif not reported:
        tune.report(last_logged())


HELDOUT_KEYS = ("heldout_gain", "heldout_kl", "heldout_win_rate")


def heldout_metrics(config: Config) -> dict:
    """The trial's PPO policy against its start on `sweep.eval_prompts` prompts of the eval split, by the run's RM
    (read back from the trial's eval.json when an interrupted sweep had finished it)."""
    out = default_eval_dir(config, "heldout")
    if (out / "eval.json").is_file():
        return heldout_row(json.loads((out / "eval.json").read_text()))
    request = run_start_vs_ppo(config, "eval", config.sweep.eval_prompts)
    if len(request.policies) < 2:
        raise RuntimeError(f"the trial exported no PPO model under {config.run.path / 'ppo'} to evaluate")
    return heldout_row(run_eval_policy(config, request, out))


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
        if not experiment.is_dir():
            raise FileNotFoundError(f"no sweep to resume at {experiment}")
        print(f"[sweep] resuming {experiment}: each trial continues from its own run folder", flush=True)
    elif experiment.exists():
        raise FileExistsError(
            f"{experiment} already holds a sweep; pass --resume to continue it or use another run.name"
        )
    # The held-out result comes one report after the last iteration: ASHA must not stop a trial before it.
    last_report = config.ppo.iterations + (sweep.rank_by == "heldout")
    scheduler = (
        ASHAScheduler(time_attr="iteration", max_t=last_report, grace_period=min(2, config.ppo.iterations))
        if sweep.scheduler == "asha"
        else None
    )
    return tune.Tuner(
        trainable,
        param_space={"base": to_dict(config), "trial": tune.grid_search(trial_specs(sweep, config.run.seed))},
        tune_config=tune.TuneConfig(
            metric=sweep.metric,
            mode=sweep.mode,
            scheduler=scheduler,
            max_concurrent_trials=sweep.max_concurrent_trials,
        ),
        run_config=tune.RunConfig(name="sweep", **ray_storage(config.run.store, storage)),
    )


def write_results(config: Config, results) -> tuple[Path, Path, Path]:
    """sweep_results.csv (one row per trial), best_config.yaml (ready for `rlhf-ray ppo`), sweep.png."""
    out = config.run.path.resolve()
    rows = []
    for result in results:
        metrics = result.metrics or {}
        rows.append(
            {
                "trial": result.config["trial"]["name"],
                "kl_coef": result.config["trial"]["kl_coef"],
                "lr": result.config["trial"]["lr"],
                # the held-out result is one report past the last iteration
                "iterations": min(metrics.get("iteration", 0), config.ppo.iterations),
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
        kl_coef, lr = chosen.config["trial"]["kl_coef"], chosen.config["trial"]["lr"]
    best_config = trial_config(to_dict(config), kl_coef, lr, f"{config.run.name}-best")
    best_path = save_config(best_config, out, "best_config.yaml")
    png = _plot(rows, out / "sweep.png")
    if config.run.store is not None:
        config.run.store.push_paths(table, best_path, png)
    return table, best_path, png


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
    if config.run.store is not None:  # an interrupted sweep to resume
        config.run.store.fetch("sweep")
    print(f"[sweep] Ray: {ray_session.connect(config.resources)}", flush=True)
    ray_session.require_shared_output(config.run, config.run.path.resolve())
    save_config(config, config.run.path.resolve())
    if config.run.store is not None:
        config.run.store.push_paths(config.run.path / "config.yaml")
    results = ray_session.run_interruptibly(build_tuner(config, resume).fit)
    table, best, png = write_results(config, results)
    print(f"[sweep] results {table}\n[sweep] best config {best}\n[sweep] plot {png}", flush=True)
    return table, best, png
