"""The scaling table and a short written model of one PPO iteration on N GPUs, filled with measured phases."""

from __future__ import annotations

PHASES = ("generate", "score_reference_values", "advantages", "update", "push_weights")


def _n(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def scaling_table(points: list[dict]) -> list[str]:
    head = ["batch", "generator replicas", "s / iteration", "responses/s", "gen tokens/s", *[f"{p} s" for p in PHASES]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in points:
        phases = [_n(p["phases_s"][name], 2) for name in PHASES]
        lines.append(
            f"| {p['batch']} | {p['replicas']} | {_n(p['s_per_iter'])} | {_n(p['responses_per_s'], 2)} | "
            f"{_n(p['gen_tokens_per_s'])} | " + " | ".join(phases) + " |"
        )
    lines += ["", "rlhf-ray only, median over the steady iterations (first dropped); phases from metrics.jsonl."]
    return lines


def reference_point(points: list[dict]) -> dict | None:
    """The single-replica point with the largest batch that has all its phases."""
    usable = [p for p in points if p["replicas"] == 1 and p["s_per_iter"] and all(p["phases_s"].values())]
    return max(usable, key=lambda p: p["batch"]) if usable else None


def gpu_model(points: list[dict]) -> list[str]:
    ref = reference_point(points)
    if ref is None:
        return ["(No complete single-replica point was measured, so the model below has no numbers.)"]
    ph = ref["phases_s"]
    total = sum(ph.values())
    gen, srv, upd = ph["generate"], ph["score_reference_values"], ph["update"]
    rest = total - gen
    share = {k: 100 * v / total for k, v in ph.items()}
    two = next((p for p in points if p["replicas"] == 2 and p["s_per_iter"]), None)
    one = two and next(
        (p for p in points if p["replicas"] == 1 and p["batch"] == two["batch"] and p["s_per_iter"]), None
    )
    lines = [
        f"Measured here at batch {ref['batch']}, one generator: {total:.1f} s of phases per iteration, of which "
        f"generation {share['generate']:.0f}%, scoring + reference + old log-probs/values "
        f"{share['score_reference_values']:.0f}%, "
        f"update {share['update']:.0f}%, weight push {share['push_weights']:.0f}%.",
        "",
        "On this machine every actor shares the same 2 cores: a second generator replica splits the batch but not "
        "the hardware"
        + (
            f" (measured at batch {two['batch']}: {_n(two['s_per_iter'])} s per iteration with 2 replicas vs "
            f"{_n(one['s_per_iter'])} s with 1, one run each)."
            if one
            else "."
        ),
        "",
        "A model of the same iteration on N >= 4 GPUs (an estimate, not a measurement), one GPU per role as "
        "`resources.*_num_gpus` allows (learner, reward, reference) and G = N - 3 generator replicas:",
        "",
        f"- generate: the batch is split over G replicas, so about {gen:.1f}/G s in this machine's units. (A GPU is "
        "much faster than these 2 cores, and not by the same factor for every phase: small-batch decoding is bound by "
        "memory bandwidth, training by compute; the shares below are this machine's.) Each replica also loads the "
        "new weights, so push_weights grows slowly with G.",
        f"- score + reference + old log-probs/values: three actors on three GPUs run at once, so the phase takes the "
        f"longest of the three rather than their sum; here they share the cores, so at best about "
        f"{srv / 3:.1f}-{srv:.1f} s.",
        f"- update: one PolicyLearner (the DeepSpeed data-parallel learner is not built), so {upd:.1f} s does not "
        "shrink with N. It bounds the speed-up.",
        f"- Amdahl with these shares: speed-up(G) = {total:.1f} / ({gen:.1f}/G + {rest:.1f}); "
        f"G=1: 1.0x, G=2: {total / (gen / 2 + rest):.2f}x, G=4: {total / (gen / 4 + rest):.2f}x, "
        f"G=8: {total / (gen / 8 + rest):.2f}x, limit {total / rest:.2f}x as G grows "
        "(more if the three scoring actors overlap, i.e. the middle phase shrinks towards a third).",
        "- Beyond that: a data-parallel learner (ZeRO over N GPUs) divides the update; overlapping generation of "
        "batch k+1 with the update of batch k (`ppo.overlap_generation`, off by default; on these 2 shared cores it "
        "gained nothing) hides the smaller of the two. Larger rollout batches "
        "raise generated tokens/s per replica (see the batch rows) until the KV cache or compute is full.",
    ]
    return lines


def scaling_section(result: dict) -> list[str]:
    return [*scaling_table(result["points"]), "", "### What happens on N GPUs", "", *gpu_model(result["points"])]
