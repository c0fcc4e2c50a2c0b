"""`python -m bench.run [--suite NAME ...] [--repeats N] [--quick]`

Suites: all, ceiling, rm, rm-bf16, rm-quality, sft, sft-bf16, ppo, ppo-bf16, grpo, rollout, rollout-bf16, scaling.

Runs the suites, prints a table per suite, writes bench/RESULTS.md and the raw per-run JSON
(bench/results/ for full runs, bench/out/results/ for --quick smoke runs).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench import machine, report, settings
from bench.common import BENCH, OUT, Progress, fmt_duration, rel
from bench.context import Context
from bench.settings import PRECISION

SUITES = (
    "ceiling",
    "rm",
    "rm-bf16",
    "rm-quality",
    "sft",
    "sft-bf16",
    "ppo",
    "ppo-bf16",
    "grpo",
    "rollout",
    "rollout-bf16",
    "scaling",
)
NEEDS_TRL = {"rm", "rm-bf16", "rm-quality", "sft", "sft-bf16", "ppo", "ppo-bf16", "grpo"}
SYSTEMS = {
    "rm": ["rlhf-ray", "trl"],
    "rm-bf16": ["rlhf-ray-bf16", "rlhf-ray-fp32", "trl-bf16"],
    "rm-quality": ["rlhf-ray", "trl"],
    "sft": ["rlhf-ray", "trl"],
    "sft-bf16": ["rlhf-ray-bf16", "rlhf-ray-fp32", "trl-bf16"],
    "ppo": ["rlhf-ray", "trl-ppo", "trl-rloo"],
    "ppo-bf16": ["rlhf-ray-bf16", "rlhf-ray-fp32", "trl-ppo-bf16"],
    "grpo": ["rlhf-ray-grpo", "trl-grpo", "rlhf-ray-gae"],
    "rollout": ["rlhf-ray", "transformers", "rlhf-ray-adapter"],
    "rollout-bf16": ["rlhf-ray", "transformers"],
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="rlhf-ray next to TRL, and against this machine's matmul ceiling. See bench/README.md.",
    )
    parser.add_argument(
        "--suite", default="all", help="all, or one or more of " + ",".join(SUITES) + " (comma-separated)"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="runs per system (default 3; 1 with --quick; scaling 1)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny smoke-run sizes; figures are not meaningful")
    parser.add_argument("--keep-work", action="store_true", help="keep the scratch folder (prepared data, run outputs)")
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite RESULTS.md from the saved JSON, run nothing"
    )
    args = parser.parse_args(argv)
    args.suites = list(SUITES) if args.suite == "all" else [s.strip() for s in args.suite.split(",") if s.strip()]
    unknown = [s for s in args.suites if s not in SUITES]
    if unknown:
        parser.error(f"unknown suite {', '.join(unknown)}; choose from all, {', '.join(SUITES)}")
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


def repeats_for(args) -> dict[str, int]:
    if args.repeats is not None:
        return {s: (1 if s == "ceiling" else args.repeats) for s in SUITES}
    return {s: 1 for s in SUITES} if args.quick else dict(settings.DEFAULT_REPEATS)


def planned_runs(suites: list[str], repeats: dict[str, int], quick: bool) -> list[tuple[str, float]]:
    """(kind, estimated seconds) of every run, in order, for the progress line."""
    scale = 0.5 if quick else 1.0
    plan = [("ceiling:torch.matmul", settings.ESTIMATE_S["ceiling"] * scale)]
    for suite in suites:
        if suite == "ceiling":
            continue
        plan.append((f"{suite}:prep", settings.ESTIMATE_S["prep"]))
        if suite == "scaling":
            s = settings.sizes("scaling", quick)
            shapes = [f"b{b}-r1" for b in s["batches"]] + [
                f"b{s['replica_batch']}-r{r}" for r in s["replicas"] if r != 1
            ]
            each = settings.ESTIMATE_S["scaling:rlhf-ray"] * scale
            plan += [(f"scaling:{n}", each) for _ in range(repeats[suite]) for n in shapes]
        else:
            plan += [
                (f"{suite}:{name}", settings.ESTIMATE_S.get(f"{suite}:{name}", 150) * scale)
                for _ in range(repeats[suite])
                for name in SYSTEMS[suite]
            ]
    return plan


def run_suite(ctx: Context, suite: str) -> dict:
    from bench import suites_ppo, suites_rollout, suites_train

    runners = {
        "ceiling": suites_train.ceiling,
        "rm": lambda c: suites_train.training_suite(c, "rm"),
        "rm-bf16": lambda c: suites_train.training_suite(c, "rm", "bf16"),
        "rm-quality": suites_train.rm_quality,
        "sft": lambda c: suites_train.training_suite(c, "sft"),
        "sft-bf16": lambda c: suites_train.training_suite(c, "sft", "bf16"),
        "ppo": suites_ppo.ppo,
        "ppo-bf16": lambda c: suites_ppo.ppo(c, "bf16"),
        "grpo": suites_ppo.grpo,
        "rollout": suites_rollout.rollout,
        "rollout-bf16": lambda c: suites_rollout.rollout(c, "bfloat16"),
        "scaling": suites_ppo.scaling,
    }
    try:
        return runners[suite](ctx)
    except Exception as err:  # a broken suite is reported, the others still run
        traceback.print_exc()
        return {"suite": suite, "error": f"{type(err).__name__}: {err}", "targets": [], "runs": []}


def results_dir(quick: bool) -> Path:
    return (OUT / "results") if quick else (BENCH / "results")


def write_results(folder: Path, quick: bool, meta: dict) -> Path:
    """RESULTS.md from every suite JSON in `folder` (suites not rerun keep their earlier figures and date)."""
    saved = {p.stem: json.loads(p.read_text()) for p in folder.glob("*.json")}
    ordered = [saved[s] for s in SUITES if s in saved]
    target = BENCH / "RESULTS.md"
    target.write_text(report.results_markdown(ordered, meta))
    return target


def saved_meta(folder: Path) -> dict:
    """The header of a report rebuilt from saved JSON: the newest invocation's date, command, machine and versions,
    and the repeats of the suites that invocation ran (from their runs)."""
    saved = [json.loads(p.read_text()) for p in folder.glob("*.json")]
    if not saved:
        raise SystemExit(f"no saved results in {rel(folder)}: run the benchmark first")
    newest = max(saved, key=lambda result: result.get("date", ""))
    ran = [r for r in saved if (r.get("date"), r.get("command")) == (newest.get("date"), newest.get("command"))]
    repeats = {r["suite"]: 1 + max((int(run["repeat"]) for run in r.get("runs", [])), default=0) for r in ran}
    return {
        "date": newest.get("date", "?"),
        "command": newest.get("command", "?"),
        "machine": newest.get("machine", "?"),
        "versions": newest.get("versions", "?"),
        "results_dir": rel(folder),
        "repeats": "of the suites this command ran: "
        + ", ".join(f"{suite} {repeats[suite]}" for suite in SUITES if suite in repeats)
        + " (each other section names the command that measured it)",
        "load_at_start": newest.get("load_at_start", "n/a"),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    folder = results_dir(args.quick)
    folder.mkdir(parents=True, exist_ok=True)
    if args.report_only:  # the figures and their header as measured, on whatever machine this runs
        print(f"[bench] wrote {write_results(folder, args.quick, saved_meta(folder))}")
        return 0
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    meta = {
        "date": now,
        "command": shlex.join(["python", "-m", "bench.run", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine.describe(),
        "versions": machine.versions(),
        "results_dir": rel(folder),
        "repeats": "of the suites this command ran: "
        + ", ".join(f"{k} {v}" for k, v in repeats_for(args).items() if k in args.suites or k == "ceiling")
        + " (each other section names the command that measured it)",
        "load_at_start": f"{os.getloadavg()[0]:.2f}",
    }
    from bench.deps import ensure_trl
    from rlhf_ray.models.provision import resolve_model

    trl_version = ensure_trl() if NEEDS_TRL & set(args.suites) else ""
    meta["versions"] = machine.versions(trl_version)
    model_dir = str(resolve_model(settings.MODEL))
    repeats = repeats_for(args)
    progress = Progress(planned_runs(args.suites, repeats, args.quick))
    work = Path(tempfile.mkdtemp(prefix="rlhf-ray-bench-"))
    print(
        f"[bench] {'SMOKE RUN (--quick): figures are not meaningful. ' if args.quick else ''}"
        f"suites {', '.join(args.suites)}; "
        f"model {model_dir}; scratch {work}; machine {meta['machine']}",
        flush=True,
    )
    if os.getloadavg()[0] > 0.5:
        print(
            f"[bench] WARNING: load average {os.getloadavg()[0]:.2f}: other work is running; the figures will be "
            "skewed (TRL's 2-thread processes suffer most). Run on a quiet machine for real figures.",
            flush=True,
        )
    print(f"[bench] estimated duration about {fmt_duration(sum(s for _, s in progress.planned))}", flush=True)
    ctx = Context(
        work=work, quick=args.quick, repeats=repeats, progress=progress, model_dir=model_dir, trl_version=trl_version
    )
    start = time.perf_counter()
    try:
        ceiling = run_suite(ctx, "ceiling")  # MFU of every row needs it, so it is always measured first
        save(folder, ceiling, args.quick, meta)  # the ceiling every MFU of this invocation used
        print(report.console(ceiling), flush=True)
        for suite in (s for s in args.suites if s != "ceiling"):
            result = run_suite(ctx, suite)
            # the precisions the suite measured (the peaks its MFU rows divide by)
            for dtype in result.get("dtypes", ["float32"]):
                if "settings" in result and ctx.peak.get(dtype):
                    result["settings"][f"MFU peak ({PRECISION[dtype]})"] = (
                        f"{ctx.peak[dtype] / 1e9:.1f} GFLOP/s, from the ceiling measured at the start of this "
                        "invocation"
                    )
            save(folder, result, args.quick, meta)
            print("\n" + report.console(result), flush=True)
    finally:
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    path = write_results(folder, args.quick, meta)
    print(
        f"\n[bench] done in {fmt_duration(time.perf_counter() - start)}; wrote {rel(path)} and {rel(folder)}/*.json",
        flush=True,
    )
    return 0


def save(folder: Path, result: dict, quick: bool, meta: dict) -> None:
    result.update(
        quick=quick,
        date=meta["date"],
        command=meta["command"],
        machine=meta["machine"],
        versions=meta["versions"],
        load_at_start=meta["load_at_start"],
    )
    (folder / f"{result['suite']}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")


if __name__ == "__main__":
    sys.exit(main())
