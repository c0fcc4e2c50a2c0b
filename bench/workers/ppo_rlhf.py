"""rlhf-ray side of the ppo and scaling suites: `run_ppo(config)` with its four Ray actors and vLLM.

Seconds per iteration are end to end: the time between consecutive `on_iteration` callbacks
(everything the driver does, logging included); the first iteration (vLLM warm-up, first
adapter load) is dropped. The per-phase seconds and generated tokens come from metrics.jsonl.
"""

from __future__ import annotations

import shutil
import time

from bench.workers._io import main, steady

PHASES = ("generate", "score_reference_values", "advantages", "update", "push_weights")


def run(spec: dict) -> dict:
    import ray

    from rlhf_ray.config import load_config
    from rlhf_ray.ppo.run import run_ppo
    from rlhf_ray.run_log import read_metrics

    config = load_config(spec["config"], spec["overrides"])
    marks: list[float] = []
    start = time.perf_counter()
    result = run_ppo(config, on_iteration=lambda *_: marks.append(time.perf_counter()))
    call_s = time.perf_counter() - start
    ray.shutdown()
    rows = read_metrics(result.output_dir / "metrics.jsonl")
    responses = config.ppo.rollout_batch_size * config.ppo.responses_per_prompt
    gen_tokens = [r["response_length"] * responses for r in rows]
    iteration_s = [b - a for a, b in zip(marks, marks[1:])]  # iterations 2..N, end to end
    kept = steady(rows)
    gen_s = sum(r["seconds_generate"] for r in kept)
    out = {
        "call_s": call_s,
        "iterations": len(rows),
        "iteration_s": iteration_s,
        "first_iteration_phase_s": rows[0]["seconds_iteration"] if rows else None,
        "phase_sum_s": [r["seconds_iteration"] for r in rows],
        "generated_tokens": gen_tokens,
        "gen_tokens_per_s": sum(r["response_length"] * responses for r in kept) / gen_s if gen_s else None,
        "phase_s": {p: [r.get(f"seconds_{p}", 0.0) for r in rows] for p in PHASES},
        "response_length": [r["response_length"] for r in rows],
        "reward_mean": [r["reward_mean"] for r in rows],
        "kl": [r["kl"] for r in rows],
        "reused_first_forward": [r.get("reused_first_forward", 0.0) for r in rows],
    }
    if not spec.get("keep_outputs"):
        shutil.rmtree(config.run.path, ignore_errors=True)
    return out


if __name__ == "__main__":
    main(run)
