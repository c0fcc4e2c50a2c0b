"""Tables for the console and bench/RESULTS.md: medians [min-max], rlhf-ray's advantage, targets met or not."""

from __future__ import annotations

import re

from bench.scaling_model import scaling_section
from rlhf_ray.models.provision import KNOWN_MODELS

SMOKE_BANNER = (
    "> **SMOKE RUN (`--quick`)**: tiny workloads, one repeat, possibly on a machine busy with other work. "
    "It only shows that every suite runs end to end; **its figures are not meaningful** and must not be "
    "quoted. Run `make bench` on a quiet machine for real figures."
)


# Paths of the machine that ran the benchmark, printed so that they say what they are: a model from the model
# cache by its name (which every command also takes in place of its folder), the run's scratch folder as <work>.
_PATH_PART = r"(?<![^\s'\"`=(\[,;:])(?:/[^\s/'\"`,;()\[\]]+)*"
_WORK_FOLDER = re.compile(_PATH_PART + r"/rlhf-ray-bench-[^\s/'\"`,;()\[\]]+")
_CACHED_MODEL = re.compile(_PATH_PART + r"/models/(" + "|".join(map(re.escape, KNOWN_MODELS)) + r")(?![\w.-])")


def neutral(text: str) -> str:
    """`text` without the temporary and home-folder paths of the machine that ran the benchmark."""
    return _CACHED_MODEL.sub(r"\1", _WORK_FOLDER.sub("<work>", text))


def num(value: float | None) -> str:
    if value is None:
        return "n/a"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if magnitude >= 0.1 else f"{value:.3g}"


def cell(summary: dict) -> str:
    if summary["median"] is None:
        return "failed" if summary.get("failed") else "-"
    if summary["n"] == 1:
        return num(summary["median"])
    return f"{num(summary['median'])} [{num(summary['min'])}-{num(summary['max'])}]"


def ab_table(result: dict) -> list[str]:
    systems = result["systems"]
    ours, peers = systems[0], systems[1:]
    head = ["metric", *systems, *[f"{ours} vs {p}" for p in peers]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result["rows"]:
        adv = [f"{row['advantage'][p]:.2f}x" if row["advantage"][p] else "-" for p in peers]
        better = f" ({'higher' if row['higher_better'] else 'lower'} is better)" if row.get("compare", True) else ""
        label = row["label"] + better
        lines.append("| " + " | ".join([label, *[cell(row["values"][s]) for s in systems], *adv]) + " |")
    lines.append("")
    lines.append(
        f"Cells: median [min-max] over repeats. `{ours} vs X` is how many times better {ours} is "
        "(X/ours for durations, ours/X for rates): above 1 means rlhf-ray is ahead."
    )
    return lines


def ceiling_table(result: dict) -> list[str]:
    lines = [
        "| dtype | " + " | ".join(f"{n}x{n}" for n in result["settings"]["sizes"]) + " | peak used for MFU |",
        "|" + "---|" * (len(result["settings"]["sizes"]) + 2),
    ]
    for row in result["ceiling"]:
        rates = [f"{row['by_size'][str(n)] / 1e9:.1f}" for n in result["settings"]["sizes"]]
        lines.append(f"| {row['dtype']} | " + " | ".join(rates) + f" | **{row['peak'] / 1e9:.1f} GFLOP/s** |")
    s = result["settings"]
    lines += [
        "",
        f"torch.matmul on square matrices, {s['threads']} threads: the best of {s.get('windows', 1)} windows of "
        f"{s['seconds']} s of back-to-back products per size (GFLOP/s). An MFU above 100% elsewhere means this "
        "was measured while other work held the cores.",
    ]
    return lines


def target_lines(targets: list[dict]) -> list[str]:
    lines = []
    for t in targets:
        state = "MET" if t["met"] else "NOT MET"
        measured = "no figure (a run failed)" if t["measured"] is None else f"{t['measured']:.2f}{t['unit']}"
        lines.append(f"- **{state}**: {t['name']}: measured {measured} (target >= {num(t['threshold'])}{t['unit']})")
    return lines


def settings_lines(settings: dict) -> list[str]:
    return [neutral(f"- {key}: {value}") for key, value in settings.items()]


def failures(result: dict) -> list[str]:
    failed = [r for r in result.get("runs", []) if not r["ok"]]
    lines = []
    for r in failed:
        first = (r["error"].strip().splitlines() or ["?"])[0]
        lines.append(neutral(f"- FAILED: {r['system']} repeat {r['repeat'] + 1}: {first} (log {r['log']})"))
    return lines


def suite_section(result: dict) -> list[str]:
    title = {
        "ceiling": "Compute ceiling",
        "rm": "Reward-model training",
        "rm-bf16": "Reward-model training in bf16",
        "sft": "SFT training",
        "sft-bf16": "SFT training in bf16",
        "ppo": "PPO iteration",
        "ppo-bf16": "PPO iteration in bf16",
        "grpo": "GRPO iteration, and what the critic costs",
        "rollout": "Rollout generation",
        "scaling": "PPO scaling on this machine",
    }
    lines = [f"## {title.get(result['suite'], result['suite'])} (`--suite {result['suite']}`)", ""]
    if result.get("error"):
        return lines + [f"**The suite failed**: {result['error']}", ""]
    lines += ["Shared settings:", "", *settings_lines(result["settings"]), ""]
    if result["suite"] == "ceiling":
        lines += ceiling_table(result)
    elif result["suite"] == "scaling":
        lines += scaling_section(result)
    else:
        lines += ab_table(result)
    if result.get("update_s"):
        phases = ", ".join(f"{name} {num(seconds)} s" for name, seconds in result["update_s"].items())
        lines += ["", f"Update phase (median seconds, first iteration dropped): {phases}."]
    if result.get("targets"):
        lines += ["", "Targets:", "", *target_lines(result["targets"])]
    if failures(result):
        lines += ["", *failures(result)]
    return lines + [""]


def console(result: dict) -> str:
    return "\n".join(suite_section(result))


def results_markdown(results: list[dict], meta: dict) -> str:
    quick = any(r.get("quick") for r in results)
    lines = ["# rlhf-ray benchmark results", ""]
    if quick:
        lines += [SMOKE_BANNER, ""]
    lines += [
        f"- date: {meta['date']}",
        f"- command: `{meta['command']}`",
        f"- machine: {meta['machine']}",
        f"- versions: {meta['versions']}",
        f"- repeats: {meta['repeats']} (each run a fresh process; A/B systems alternate)",
        f"- 1-minute load average before the first run: {meta.get('load_at_start', 'n/a')} (near 0 on a quiet "
        "machine; anything else running skews every figure)",
        f"- raw per-run JSON: `{meta['results_dir']}/<suite>.json`; logs in `bench/out/logs/`",
        "",
    ]
    all_targets = [t for r in results for t in r.get("targets", [])]
    if all_targets:
        met = sum(t["met"] for t in all_targets)
        heading = f"## Targets: {met} of {len(all_targets)} met" + (" (smoke run: these say nothing)" if quick else "")
        lines += [heading, "", *target_lines(all_targets), ""]
    for result in results:
        if result.get("date") and (result["date"], result.get("command")) != (meta["date"], meta["command"]):
            measured = f"{result['date']} by `{result.get('command', '?')}`"
            result = {**result, "settings": {"measured on": measured, **result.get("settings", {})}}
        lines += suite_section(result)
    lines += [
        "## FLOP counting",
        "",
        "See `bench/README.md`: training 6N per real token (LoRA: 4N), forward 2N, "
        "generation 2N per generated token; N = parameters in matrix multiplies (LM head included for "
        "causal LMs, 1-output score head for reward/value models); attention score FLOPs and prefill of "
        "generation not counted. MFU = achieved FLOP/s over the ceiling suite's matmul peak for the row's precision "
        "(bf16 for `-bf16` systems and the bf16 rollout suite, fp32 otherwise).",
        "",
    ]
    return "\n".join(lines)
