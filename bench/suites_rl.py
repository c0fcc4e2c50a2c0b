"""The ppo suite (rlhf-ray vs TRL PPOTrainer and RLOOTrainer), rollout (vLLM vs transformers) and scaling."""

from __future__ import annotations

import os
import statistics

from bench import flops
from bench.common import SHARED_DATA, median_or_none, rel
from bench.context import Context, System
from bench.deps import trl_env
from bench.settings import LORA_TARGETS, sizes
from bench.suites_train import print_settings
from bench.summary import Metric, row, safe, table, target


def actor_cpus(replicas: int, default: float) -> float:
    """CPUs per PPO actor so that 3 + replicas actors fit on this machine (Ray would wait forever otherwise)."""
    return min(default, int(100 * (os.cpu_count() or 2) / (3 + replicas)) / 100)


def ppo_overrides(s: dict, ctx: Context, name: str, shared: dict, batch: int, replicas: int = 1,
                  iterations: int | None = None) -> list[str]:
    return [f"run.output_dir={ctx.work}/runs", f"run.name={name}", f"ppo.policy_model={shared['model_path']}",
            f"ppo.reward_model={ctx.work / 'reward-model'}", f"data.prompts.path={shared['path']}",
            f"data.prompts.format={shared['format']}", "data.overlong=truncate_prompt", "data.on_bad_row=skip",
            f"data.max_prompt_length={s['max_prompt_length']}", f"data.max_length={s['max_prompt_length'] + s['max_new_tokens']}",
            f"ppo.iterations={iterations or s['iterations']}", f"ppo.rollout_batch_size={batch}",
            f"ppo.minibatch_size={min(s['minibatch'], batch)}", f"ppo.ppo_epochs={s['epochs']}",
            f"ppo.max_new_tokens={s['max_new_tokens']}", f"ppo.lr={s['lr']}", f"ppo.kl_coef={s['kl_coef']}",
            "ppo.checkpoint_every=0", "ppo.sample_every=0", f"lora.r={s['lora_r']}", f"lora.alpha={s['lora_alpha']}",
            f"resources.generator_replicas={replicas}", f"resources.actor_num_cpus={actor_cpus(replicas, s['actor_num_cpus'])}",
            "model.dtype=float32"]


def prep_prompts(ctx: Context, suite: str, s: dict, reward_model: bool) -> dict:
    path = s["prompts"] if s["prompts"].startswith("data/") else rel(SHARED_DATA / s["prompts"])
    fmt = "prompts" if path.startswith("data/") else "hh-rlhf"
    overrides = [f"data.prompts.path={path}", f"data.prompts.format={fmt}", f"data.max_prompt_length={s['max_prompt_length']}",
                 f"data.max_length={s['max_prompt_length'] + s['max_new_tokens']}", "data.overlong=truncate_prompt",
                 "data.on_bad_row=skip"]
    if s.get("batches"):
        overrides.append(f"data.prompts.limit={max(s['batches'])}")
    spec = {"kind": "prompts", "config": "configs/demo.yaml", "overrides": overrides, "data_out": str(ctx.work / f"{suite}-prompts.json"),
            "reward_model_out": str(ctx.work / "reward-model") if reward_model else None}
    return {**ctx.prep(suite, spec), "data": spec["data_out"], "path": path, "format": fmt}


def run_median(values: list) -> float | None:
    return median_or_none(values)


def ppo(ctx: Context) -> dict:
    s = sizes("ppo", ctx.quick)
    shared = prep_prompts(ctx, "ppo", s, reward_model=True)
    settings = {"policy": f"{shared['model_path']} + LoRA r={s['lora_r']} alpha={s['lora_alpha']} on {', '.join(LORA_TARGETS)}",
                "reward model": "SmolLM2 with a fresh scalar head (AutoModelForSequenceClassification, num_labels=1), "
                                "reward_stats mean 0 std 1; TRL's value model starts from it too",
                "prompts": shared["summary"], "max prompt length": s["max_prompt_length"],
                "responses per iteration": f"{s['rollout_batch']} (rlhf-ray, TRL PPO: {s['rollout_batch']} prompts x 1; "
                                           f"RLOO: {s['rollout_batch'] // 2} prompts x 2)",
                "max new tokens": s["max_new_tokens"], "PPO epochs x minibatches": f"{s['epochs']} x {s['rollout_batch'] // s['minibatch']} "
                f"(minibatch {s['minibatch']})", "iterations": f"{s['iterations']} (the first is dropped)", "lr": s["lr"],
                "KL coef": s["kl_coef"], "sampling": "temperature 1, top-p 1", "precision": "fp32",
                "generation": "rlhf-ray: vLLM CPU build (enforce_eager) in a Ray actor; TRL: transformers generate"}
    print_settings("ppo", settings)
    rl_spec = {"model_path": shared["model_path"], "reward_model": str(ctx.work / "reward-model"), "data": shared["data"],
               "rollout_batch": s["rollout_batch"], "minibatch": s["minibatch"], "epochs": s["epochs"],
               "max_new_tokens": s["max_new_tokens"], "iterations": s["iterations"], "lr": s["lr"], "kl_coef": s["kl_coef"],
               "lora_r": s["lora_r"], "lora_alpha": s["lora_alpha"], "lora_target_modules": LORA_TARGETS}
    systems = [
        System("rlhf-ray", "bench.workers.ppo_rlhf", lambda i: {
            "config": "configs/demo.yaml", "overrides": ppo_overrides(s, ctx, f"bench-ppo-{i}", shared, s["rollout_batch"])}),
        System("trl-ppo", "bench.workers.rl_trl", lambda i: {**rl_spec, "trainer": "ppo"}, trl_env()),
        System("trl-rloo", "bench.workers.rl_trl", lambda i: {**rl_spec, "trainer": "rloo"}, trl_env()),
    ]
    runs = ctx.alternate("ppo", systems)
    params = flops.model_params(shared["model_path"])
    prompt_tokens = shared["mean_prompt_tokens"] * s["rollout_batch"]
    peak = ctx.peak.get("float32")

    def iteration_flops(record) -> float:
        response_tokens = statistics.median(record.result["generated_tokens"])
        return flops.ppo_iteration_flops(params, prompt_tokens, response_tokens, s["epochs"],
                                         full_value_model=record.system == "trl-ppo",
                                         value_forward=record.system != "trl-ppo")

    def update_mfu(record) -> float | None:
        if record.system != "rlhf-ray":
            return None
        seq = prompt_tokens + statistics.median(record.result["generated_tokens"])
        update_s = run_median(record.result["phase_s"]["update"][1:])
        return 100 * flops.mfu(s["epochs"] * flops.train_flops(params["lm"], seq, lora=True) / update_s, peak)

    metrics = [
        Metric("s_per_iter", "seconds per iteration (median, end to end, first dropped)", "s", False,
               safe(lambda r: run_median(r.result["iteration_s"]))),
        Metric("gen_tokens_per_s", "generated tokens/s during generation", "tokens/s", True, safe(lambda r: r.result["gen_tokens_per_s"])),
        Metric("tokens_per_iter", "generated tokens per iteration (median)", "tokens", True,
               safe(lambda r: statistics.median(r.result["generated_tokens"]))),
        Metric("mfu", "MFU of the whole iteration (see FLOP counting)", "%", True,
               safe(lambda r: 100 * flops.mfu(iteration_flops(r) / run_median(r.result["iteration_s"]), peak))),
        Metric("update_mfu", "MFU of rlhf-ray's update phase (LoRA, 4N per token per epoch)", "%", True, safe(update_mfu)),
        Metric("call_s", "wall s of the call (run_ppo / trainer set-up + train)", "s", False, safe(lambda r: r.result["call_s"])),
        Metric("process_s", "wall s of the whole process", "s", False, safe(lambda r: r.process_s)),
    ]
    names = ["rlhf-ray", "trl-ppo", "trl-rloo"]
    rows = table(runs, names, metrics)
    targets = [target("PPO seconds per iteration >= 2x faster than TRL PPOTrainer", row(rows, "s_per_iter")["advantage"]["trl-ppo"], 2.0),
               target("PPO update phase (rlhf-ray, LoRA) >= 40% of fp32 matmul peak",
                      row(rows, "update_mfu")["values"]["rlhf-ray"]["median"], 40.0, "%")]
    return {"suite": "ppo", "settings": settings, "systems": names, "runs": [r.to_dict() for r in runs], "rows": rows,
            "targets": targets}


def rollout(ctx: Context) -> dict:
    s = sizes("rollout", ctx.quick)
    shared = prep_prompts(ctx, "rollout", s, reward_model=False)
    settings = {"model": shared["model_path"], "prompts": shared["summary"], "batches": s["batches"],
                "max new tokens": s["max_new_tokens"], "sampling": "temperature 1, top-p 1, no top-k, EOS stops",
                "precision": "fp32", "rlhf-ray": f"actors.rollout_generator.RolloutGenerator (vLLM CPU build, enforce_eager="
                f"{s['enforce_eager']}, enable_lora with no adapter loaded, KV cache {s['kv_cache_gib']} GiB) in the process",
                "transformers": "AutoModelForCausalLM.generate, left padding, one call per batch",
                "counted": "real generated tokens (up to and including EOS) over the generate call's wall time, prefill included"}
    print_settings("rollout", settings)
    base = {"model_path": shared["model_path"], "data": shared["data"], "batches": s["batches"], "max_new_tokens": s["max_new_tokens"],
            "max_model_len": s["max_prompt_length"] + s["max_new_tokens"], "kv_cache_gib": s["kv_cache_gib"],
            "enforce_eager": s["enforce_eager"], "lora_r": s["lora_r"]}
    systems = [System("rlhf-ray", "bench.workers.rollout", lambda i: {**base, "engine": "vllm"}),
               System("transformers", "bench.workers.rollout", lambda i: {**base, "engine": "hf"})]
    runs = ctx.alternate("rollout", systems)
    lm, peak = flops.model_params(shared["model_path"])["lm"], ctx.peak.get("float32")
    metrics = []
    for b in s["batches"]:
        metrics.append(Metric(f"tps_{b}", f"tokens/s at batch {b}", "tokens/s", True,
                              safe(lambda r, b=b: r.result["by_batch"][str(b)]["tokens_per_s"])))
        metrics.append(Metric(f"mfu_{b}", f"MFU at batch {b} (2N per generated token)", "%", True,
                              safe(lambda r, b=b: 100 * flops.mfu(flops.generation_flops(lm, r.result["by_batch"][str(b)]["tokens_per_s"]), peak))))
    metrics.append(Metric("startup_s", "start-up s (engine / model load)", "s", False, safe(lambda r: r.result["startup_s"])))
    rows = table(runs, ["rlhf-ray", "transformers"], metrics)
    b64 = 64 if 64 in s["batches"] else max(b for b in s["batches"] if b <= 64)
    name = "rollout tokens/s >= 2x transformers generate at batch 64" + ("" if b64 == 64 else f" (smoke: batch {b64} stands in)")
    targets = [target(name, row(rows, f"tps_{b64}")["advantage"]["transformers"], 2.0)]
    return {"suite": "rollout", "settings": settings, "systems": ["rlhf-ray", "transformers"], "runs": [r.to_dict() for r in runs],
            "rows": rows, "targets": targets}


def scaling(ctx: Context) -> dict:
    s = {**sizes("ppo", ctx.quick), **sizes("scaling", ctx.quick)}
    shared = prep_prompts(ctx, "scaling", s, reward_model=True)
    shapes = [(b, 1) for b in s["batches"]] + [(s["replica_batch"], r) for r in s["replicas"] if r != 1]
    settings = {"policy": shared["model_path"], "prompts": shared["summary"], "shapes (batch, generator replicas)": shapes,
                "iterations": f"{s['iterations']} (the first is dropped)", "other settings": "as the ppo suite",
                "CPUs per actor": {r: actor_cpus(r, s["actor_num_cpus"]) for r in sorted({r for _, r in shapes})}}
    print_settings("scaling", settings)
    runs = []
    for repeat in range(ctx.repeats["scaling"]):
        for batch, replicas in shapes:
            name = f"b{batch}-r{replicas}"
            system = System(name, "bench.workers.ppo_rlhf", lambda i, b=batch, r=replicas, n=name: {
                "config": "configs/demo.yaml",
                "overrides": ppo_overrides(s, ctx, f"bench-scaling-{n}-{i}", shared, b, r, s["iterations"])})
            runs.append(ctx.run("scaling", system, repeat))
    points = []
    for batch, replicas in shapes:
        mine = [r for r in runs if r.system == f"b{batch}-r{replicas}" and r.ok]
        s_iter = median_or_none([run_median(r.result["iteration_s"]) for r in mine])
        phases = {p: median_or_none([run_median(r.result["phase_s"][p][1:]) for r in mine])
                  for p in ("generate", "score_reference_values", "advantages", "update", "push_weights")}
        points.append({"batch": batch, "replicas": replicas, "s_per_iter": s_iter, "phases_s": phases,
                       "responses_per_s": batch / s_iter if s_iter else None,
                       "gen_tokens_per_s": median_or_none([r.result["gen_tokens_per_s"] for r in mine])})
    return {"suite": "scaling", "settings": settings, "runs": [r.to_dict() for r in runs], "points": points, "targets": []}
