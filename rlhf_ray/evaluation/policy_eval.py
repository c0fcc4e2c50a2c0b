"""`rlhf-ray eval policy`: policies compared on held-out prompts, judged by one or more reward models.

Every policy answers the same prompts with the same sampling seeds. The first policy is the
baseline: each other policy's win-rate is taken against its response to the same prompt (same
sample index), and its KL to the first policy is measured on its own samples.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path

from rlhf_ray.algo.evaluation import mean_and_std, win_rate


@dataclass
class PolicySamples:
    name: str
    path: str
    prompt_index: list[int]  # which prompt each sample answers (n samples per prompt, in prompt order)
    responses: list[list[int]]  # sampled token ids (EOS included when the policy stopped)
    finished: list[bool]  # stopped at EOS rather than at max_new_tokens
    texts: list[str] = field(default_factory=list)  # decoded responses
    rewards: dict[str, list[float]] = field(default_factory=dict)  # reward model name -> raw score per sample
    kl: list[float] = field(default_factory=list)  # per sample: sum of log p - log p_first over its tokens


def summarise(policies: list[PolicySamples]) -> dict:
    """Per policy: reward mean/std per RM, its gain over the first policy in that policy's reward std,
    win-rate against the first policy per RM, KL to the first policy, response length and finish rate."""
    first = policies[0]
    summary = {}
    for policy in policies:
        per_rm = {}
        for rm, rewards in policy.rewards.items():
            mean, std = mean_and_std(rewards)
            first_mean, first_std = mean_and_std(first.rewards[rm])
            per_rm[rm] = {
                "mean": mean,
                "std": std,
                "gain_in_first_std": (mean - first_mean) / first_std if first_std > 0 else 0.0,
                "win_rate_vs_first": win_rate(rewards, first.rewards[rm]).as_dict(),
            }
        lengths = [len(r) for r in policy.responses]
        summary[policy.name] = {
            "path": policy.path,
            "samples": len(policy.responses),
            "reward": per_rm,
            "kl_to_first": mean_and_std(policy.kl)[0] if policy.kl else 0.0,
            "response_tokens": sum(lengths) / len(lengths),
            "finish_rate": sum(policy.finished) / len(policy.finished),
        }
    return summary


def summary_table(results: dict) -> list[str]:
    """The report's table: one row per policy and reward model."""
    lines = [
        "policy | reward model | mean reward | std | gain (baseline std) | win-rate vs baseline | "
        "KL to baseline | tokens | finished",
        "--- | --- | --- | --- | --- | --- | --- | --- | ---",
    ]
    for name, s in results["policies"].items():
        for rm, r in s["reward"].items():
            w = r["win_rate_vs_first"]
            lines.append(
                f"{name} | {rm} | {r['mean']:.3f} | {r['std']:.3f} | {r['gain_in_first_std']:+.3f} | "
                f"{w['rate']:.3f} [{w['low']:.3f}, {w['high']:.3f}] | {s['kl_to_first']:.3f} | "
                f"{s['response_tokens']:.1f} | {s['finish_rate']:.2f}"
            )
    return lines


def markdown_report(results: dict) -> str:
    names = list(results["policies"])
    lines = [
        "# Policy evaluation",
        "",
        results["prompts"],
        "",
        f"sampling: {results['sampling']}",
        "",
        f"Baseline (first policy): `{names[0]}`. Win-rates against it with a 95% interval; "
        "gain: difference in mean reward over the baseline's reward std. KL: nats per response, "
        "on the policy's own samples.",
        "",
        *summary_table(results),
        "",
        "Samples side by side: `samples.md` (first prompts) and `samples.html` (all); token ids, "
        "rewards and per-sample KL in `samples.json`.",
    ]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


def samples_markdown(prompts: list[str], policies: list[PolicySamples], limit: int = 20) -> str:
    rm = next(iter(policies[0].rewards), None)
    header = ["prompt"] + [f"{p.name}" + (f" ({rm})" if rm else "") for p in policies]
    lines = [" | ".join(header), " | ".join(["---"] * len(header))]
    for k in range(min(limit, len(policies[0].texts))):
        cells = [_cell(prompts[policies[0].prompt_index[k]])]
        for p in policies:
            score = f" **[{p.rewards[rm][k]:.2f}]**" if rm else ""
            cells.append(_cell(p.texts[k]) + score)
        lines.append(" | ".join(cells))
    return "# Samples\n\n" + "\n".join(lines) + "\n"


def samples_html(prompts: list[str], policies: list[PolicySamples]) -> str:
    rms = list(policies[0].rewards)
    head = "".join(f"<th>{html.escape(p.name)}</th>" for p in policies)
    rows = []
    for k in range(len(policies[0].texts)):
        cells = [f"<td><pre>{html.escape(prompts[policies[0].prompt_index[k]])}</pre></td>"]
        for p in policies:
            scores = ", ".join(f"{html.escape(rm)}: {p.rewards[rm][k]:.3f}" for rm in rms)
            cells.append(f"<td><pre>{html.escape(p.texts[k])}</pre><small>{scores}</small></td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    style = (
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px;vertical-align:top;"
        "max-width:40em}pre{white-space:pre-wrap;margin:0}"
    )
    return (
        f"<!doctype html><meta charset='utf-8'><title>rlhf-ray samples</title><style>{style}</style>"
        f"<table><tr><th>prompt</th>{head}</tr>{''.join(rows)}</table>\n"
    )


def write_results(results: dict, prompts: list[str], policies: list[PolicySamples], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "report.md").write_text(markdown_report(results))
    (out / "samples.md").write_text(samples_markdown(prompts, policies))
    (out / "samples.json").write_text(
        json.dumps(
            {
                p.name: {
                    "path": p.path,
                    "prompt_index": p.prompt_index,
                    "responses": p.responses,
                    "finished": p.finished,
                    "texts": p.texts,
                    "rewards": p.rewards,
                    "kl": p.kl,
                }
                for p in policies
            }
        )
        + "\n"
    )
    (out / "samples.html").write_text(samples_html(prompts, policies))
