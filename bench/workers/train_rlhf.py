"""rlhf-ray side of the rm and sft suites: `run_stage(config, stage)` as a user would call it.

Steady-state throughput comes from the metrics.jsonl the job writes: each step's `tokens_per_s`
is that step's real tokens over its wall time (eval and checkpoints excluded). The step's real
tokens are known from the rows it consumed (prep.training_order), which gives each step's seconds.
With rm.shared_prompt a pair's prompt is computed once, so the tokens run through the model
(`computed_tokens_per_s`, what MFU counts) are fewer than the real tokens the pairs stand for.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from bench.workers._io import main, steady


def row_tokens(row: dict) -> int:
    return len(row["chosen_ids"]) + len(row["rejected_ids"]) if "chosen_ids" in row else len(row["input_ids"])


def computed_tokens(row: dict, shared_prompt: bool) -> int:
    """Tokens the model actually runs for a row: a pair's shared prompt once with rm.shared_prompt."""
    from rlhf_ray.train.batches import packed_pair_length

    return packed_pair_length(row) if shared_prompt and "chosen_ids" in row else row_tokens(row)


def per_step_seconds(
    metrics: list[dict], rows_in_order: list[dict], rows_per_step: int, shared_prompt: bool = False
) -> list[tuple[int, float, int]]:
    """(real tokens, seconds, tokens computed) of every logged step, from its tokens_per_s and the rows it took."""
    steps = []
    for row in metrics:
        if "tokens_per_s" not in row:
            continue
        k = row["step"]
        taken = rows_in_order[(k - 1) * rows_per_step : k * rows_per_step]
        tokens = sum(row_tokens(r) for r in taken)
        steps.append((tokens, tokens / row["tokens_per_s"], sum(computed_tokens(r, shared_prompt) for r in taken)))
    return steps


def score_exported(folder: Path, data: dict, batch: int) -> float:
    from transformers import AutoModelForSequenceClassification

    from bench.workers.rm_score import heldout_accuracy

    model = AutoModelForSequenceClassification.from_pretrained(str(folder), dtype="float32", use_safetensors=True)
    return heldout_accuracy(model, data["eval"], data["pad_id"], batch)


def run(spec: dict) -> dict:
    import ray

    from rlhf_ray.config import load_config
    from rlhf_ray.run_log import read_metrics
    from rlhf_ray.train.launch import run_stage

    stage = spec["stage"]
    config = load_config(spec["config"], spec["overrides"])
    start = time.perf_counter()
    result = run_stage(config, stage)
    call_s = time.perf_counter() - start
    ray.shutdown()
    metrics = read_metrics(result.output_dir / "metrics.jsonl")
    data = json.loads(Path(spec["data"]).read_text())
    stage_config = getattr(config, stage)
    rows_per_step = stage_config.batch_size * config.resources.num_workers * stage_config.grad_accum
    steps = per_step_seconds(metrics, data["train_in_order"], rows_per_step, stage == "rm" and config.rm.shared_prompt)
    kept = steady(steps)
    seconds = sum(s for _, s, _ in kept)
    final = metrics[-1] if metrics else {}
    out = {
        "call_s": call_s,
        "steps": len(steps),
        "step_seconds": [s for _, s, _ in steps],
        "step_tokens": [t for t, _, _ in steps],
        "steady_steps": len(kept),
        "tokens_per_s": sum(t for t, _, _ in kept) / seconds if seconds else None,
        "computed_tokens_per_s": sum(c for _, _, c in kept) / seconds if seconds else None,
        "rows_per_s": rows_per_step * len(kept) / seconds if seconds else None,
        "final_metrics": final,
    }
    if stage == "rm":
        out["heldout_accuracy"] = final.get("eval_accuracy")
        if spec.get(
            "score_heldout"
        ):  # the exported model scored as the peer's is (rm_score), beside the job's own eval
            out["job_eval_accuracy"] = out["heldout_accuracy"]
            out["heldout_accuracy"] = score_exported(result.output_dir / "model", data, stage_config.batch_size)
    else:
        out["eval_loss"] = final.get("eval_loss")
    if not spec.get("keep_outputs"):
        shutil.rmtree(config.run.path, ignore_errors=True)  # checkpoints of a full model are ~1.6 GB
    return out


if __name__ == "__main__":
    main(run)
