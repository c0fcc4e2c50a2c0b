"""The rollout suites: rlhf-ray's RolloutGenerator (vLLM CPU build) vs batched transformers generate.

`rollout` runs both in fp32 (the precision of the PPO suite); `rollout-bf16` runs both in bf16.
"""

from __future__ import annotations

from bench import flops
from bench.context import Context, System
from bench.settings import LORA_TARGETS, PRECISION, sizes
from bench.suites_ppo import prep_prompts
from bench.suites_train import print_settings
from bench.summary import Metric, row, safe, table, target


def rollout_metrics(batches: list[int], lm_params: int, peak: float | None, lora_rows: bool) -> list[Metric]:
    metrics = []
    for b in batches:

        def tokens_per_s(record, b=b) -> float:
            return record.result["by_batch"][str(b)]["tokens_per_s"]

        metrics.append(Metric(f"tps_{b}", f"tokens/s at batch {b}", "tokens/s", True, safe(tokens_per_s)))
        metrics.append(
            Metric(
                f"mfu_{b}",
                f"MFU at batch {b} (2N per generated token)",
                "%",
                True,
                safe(lambda r, f=tokens_per_s: 100 * flops.mfu(flops.generation_flops(lm_params, f(r)), peak)),
            )
        )
    for b in batches if lora_rows else []:
        metrics.append(
            Metric(
                f"tps_lora_{b}",
                f"tokens/s at batch {b} with a LoRA adapter loaded (ppo.weight_sync=adapter)",
                "tokens/s",
                True,
                safe(lambda r, b=b: r.result["by_batch_lora"][str(b)]["tokens_per_s"]),
                compare=False,
            )
        )
    metrics.append(
        Metric("startup_s", "start-up s (engine / model load)", "s", False, safe(lambda r: r.result["startup_s"]))
    )
    return metrics


def rollout(ctx: Context, dtype: str = "float32") -> dict:
    """fp32: rlhf-ray, transformers and the enable_lora engine; bf16: rlhf-ray and transformers."""
    suite = "rollout" if dtype == "float32" else f"rollout-{PRECISION[dtype]}"
    with_adapter = dtype == "float32"  # the enable_lora engine is measured in fp32 only
    s = sizes("rollout", ctx.quick)
    shared = prep_prompts(ctx, "rollout", s, reward_model=False, limit=2 * sum(s["batches"]) + 8)
    compile_note = (
        "enforce_eager=True: eager"
        if s["enforce_eager"]
        else "enforce_eager=False, as PPO's default ppo.vllm_enforce_eager=false: a torch.compile graph, "
        "compiled at start-up (shorter when inductor's on-disk cache has it)"
    )
    settings = {
        "model": shared["model_path"],
        "prompts": shared["summary"],
        "batches": s["batches"],
        "max new tokens": s["max_new_tokens"],
        "sampling": "temperature 1, top-p 1, no top-k, EOS stops",
        "precision": f"{PRECISION[dtype]} on both sides (weights, activations and KV cache)",
        "rlhf-ray": f"actors.rollout_generator.RolloutGenerator (vLLM CPU build, {compile_note}; KV cache "
        f"{s['kv_cache_gib']} GiB) built in the process, started as PPO's default "
        "ppo.weight_sync=merged starts it (no LoRA support; the learner's weights are reloaded in place)",
        "transformers": "AutoModelForCausalLM.generate, left padding, one call per batch",
        "counted": "real generated tokens (up to and including EOS) over the generate call's wall time, prefill "
        "included; each batch gets prompts no earlier call had",
    }
    if with_adapter:
        settings["rlhf-ray-adapter"] = (
            "the same engine started as ppo.weight_sync=adapter starts it (enable_lora; "
            "vLLM's CPU backend then always runs eager), measured with no adapter, then "
            "again on fresh prompts with a zero LoRA adapter loaded"
        )
        settings["LoRA rows"] = (
            f"rlhf-ray-adapter after loading a zero LoRA adapter (r={s['lora_r']}, on "
            f"{', '.join(LORA_TARGETS)}); information only, not the target"
        )
    print_settings(suite, settings)
    base = {
        "model_path": shared["model_path"],
        "data": shared["data"],
        "batches": s["batches"],
        "dtype": dtype,
        "max_new_tokens": s["max_new_tokens"],
        "max_model_len": s["max_prompt_length"] + s["max_new_tokens"],
        "kv_cache_gib": s["kv_cache_gib"],
        "enforce_eager": s["enforce_eager"],
        "lora_r": s["lora_r"],
        "lora_target_modules": LORA_TARGETS,
        "enable_lora": False,
    }
    engines = {
        "rlhf-ray": {"engine": "vllm"},
        "transformers": {"engine": "hf"},
        "rlhf-ray-adapter": {"engine": "vllm", "enable_lora": True},
    }
    names = list(engines) if with_adapter else ["rlhf-ray", "transformers"]
    runs = ctx.alternate(
        suite, [System(name, "bench.workers.rollout", lambda i, name=name: {**base, **engines[name]}) for name in names]
    )
    lm = flops.model_params(shared["model_path"])["lm"]
    rows = table(runs, names, rollout_metrics(s["batches"], lm, ctx.peak.get(dtype), lora_rows=with_adapter))
    b64 = 64 if 64 in s["batches"] else max(b for b in s["batches"] if b <= 64)
    name = f"rollout tokens/s >= 2x transformers generate at batch 64, both {PRECISION[dtype]}" + (
        "" if b64 == 64 else f" (smoke: batch {b64} stands in)"
    )
    targets = [target(name, row(rows, f"tps_{b64}")["advantage"]["transformers"], 2.0)]
    return {
        "suite": suite,
        "dtypes": [dtype],
        "settings": settings,
        "systems": names,
        "runs": [r.to_dict() for r in runs],
        "rows": rows,
        "targets": targets,
    }
