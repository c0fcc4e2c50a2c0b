"""The ppo suite (rlhf-ray vs TRL PPOTrainer and RLOOTrainer), the grpo suite (rlhf-ray's GRPO, and its PPO with a
critic on the same batch, vs TRL GRPOTrainer) and the scaling suite (rlhf-ray alone)."""

from __future__ import annotations

import os
import statistics

from bench import flops
from bench.common import SHARED_DATA, median_or_none, rel
from bench.context import Context, System
from bench.deps import trl_env
from bench.settings import LORA_TARGETS, PRECISION_SETTING, dtype_of, sizes
from bench.suites_train import cli, print_settings
from bench.summary import Metric, row, safe, table, target, wall_time_metrics

PHASES = ("generate", "score_reference_values", "advantages", "update", "push_weights")


def actor_cpus(replicas: int, default: float) -> float:
    """CPUs per PPO actor so that 3 + replicas actors fit on this machine (Ray would wait forever otherwise)."""
    return min(default, int(100 * (os.cpu_count() or 2) / (3 + replicas)) / 100)


def prep_prompts(ctx: Context, suite: str, s: dict, reward_model: bool, limit: int | None = None) -> dict:
    """Chat-templated prompt ids (and the bench reward model) via rlhf-ray's prompt loader."""
    path = s["prompts"] if s["prompts"].startswith("data/") else rel(SHARED_DATA / s["prompts"])
    fmt = "prompts" if path.startswith("data/") else "hh-rlhf"
    overrides = [
        f"data.prompts.path={path}",
        f"data.prompts.format={fmt}",
        "data.overlong=truncate_prompt",
        f"data.max_prompt_length={s['max_prompt_length']}",
        "data.on_bad_row=skip",
        f"data.max_length={s['max_prompt_length'] + s['max_new_tokens']}",
    ]
    if limit:
        overrides.append(f"data.prompts.limit={limit}")
    spec = {
        "kind": "prompts",
        "config": "configs/demo.yaml",
        "overrides": overrides,
        "data_out": str(ctx.work / f"{suite}-prompts.json"),
        "reward_model_out": str(ctx.work / "reward-model") if reward_model else None,
    }
    return {**ctx.prep(suite, spec), "data": spec["data_out"], "path": path, "format": fmt}


def ppo_overrides(
    s: dict, ctx: Context, name: str, shared: dict, batch: int, replicas: int = 1, precision: str = "fp32"
) -> list[str]:
    """configs/demo.yaml plus these: bench policy and reward model, prompts, batch, lengths, epochs, LoRA, actors,
    precision (fp32, or bf16: bf16 matmuls over fp32 weights in every actor and a bf16 vLLM generator)."""
    return [
        f"run.output_dir={ctx.work}/runs",
        f"run.name={name}",
        f"ppo.policy_model={shared['model_path']}",
        f"ppo.reward_model={ctx.work / 'reward-model'}",
        f"data.prompts.path={shared['path']}",
        f"data.prompts.format={shared['format']}",
        "data.overlong=truncate_prompt",
        "data.on_bad_row=skip",
        f"data.max_prompt_length={s['max_prompt_length']}",
        f"data.max_length={s['max_prompt_length'] + s['max_new_tokens']}",
        f"ppo.iterations={s['iterations']}",
        f"ppo.rollout_batch_size={batch}",
        f"ppo.minibatch_size={min(s['minibatch'], batch)}",
        f"ppo.ppo_epochs={s['epochs']}",
        f"ppo.max_new_tokens={s['max_new_tokens']}",
        f"ppo.lr={s['lr']}",
        f"ppo.kl_coef={s['kl_coef']}",
        "ppo.checkpoint_every=0",
        "ppo.sample_every=0",
        f"lora.r={s['lora_r']}",
        f"lora.alpha={s['lora_alpha']}",
        f"resources.generator_replicas={replicas}",
        f"resources.actor_num_cpus={actor_cpus(replicas, s['actor_num_cpus'])}",
        "model.dtype=float32",
        f"model.precision={PRECISION_SETTING[precision]}",
        f"ppo.vllm_enforce_eager={str(s['vllm_enforce_eager']).lower()}",
    ]


def ppo_settings(s: dict, shared: dict, ctx: Context, precision: str = "fp32") -> dict:
    batch, mini = s["rollout_batch"], s["minibatch"]
    return {
        "policy": f"{shared['model_path']} + LoRA r={s['lora_r']} alpha={s['lora_alpha']} on {', '.join(LORA_TARGETS)}",
        "reward model": "SmolLM2 with a fresh scalar head (AutoModelForSequenceClassification, num_labels=1), "
        "reward_stats mean 0 std 1; TRL's PPO value model starts from it too",
        "prompts": shared["summary"],
        "max prompt length": s["max_prompt_length"],
        "responses per iteration": (
            f"{batch} (rlhf-ray and TRL PPO: {batch} prompts x 1; RLOO: {batch // 2} prompts x 2)"
        ),
        "max new tokens": s["max_new_tokens"],
        "PPO epochs x minibatches": f"{s['epochs']} x {batch // mini} (minibatch {mini})",
        "iterations": f"{s['iterations']} (the first is dropped)",
        "lr": s["lr"],
        "KL coef": s["kl_coef"],
        "sampling": "temperature 1, top-p 1",
        "precision": "fp32 on every side"
        if precision == "fp32"
        else "bf16 rows: rlhf-ray model.precision=bf16-mixed (bf16 matmuls over fp32 weights in the learner, "
        "reference and reward actors; the vLLM generator in bf16); TRL bf16=True (autocast over fp32 weights); "
        "the rlhf-ray-fp32 row is model.precision=fp32, for the ratio",
        "generation": (
            f"rlhf-ray: vLLM CPU build in a Ray actor (ppo.vllm_enforce_eager={s['vllm_enforce_eager']}; the "
            "default, False, compiles the model at start-up, before the first iteration), the learner's "
            "merged weights reloaded each iteration (ppo.weight_sync=merged); TRL: transformers generate"
        ),
        "rlhf-ray run (CLI equivalent of repeat 1)": cli(
            "ppo", ppo_overrides(s, ctx, "bench-ppo-0", shared, batch, precision=precision)
        ),
    }


def ppo_metrics(s: dict, shared: dict, peak: dict[str, float]) -> list[Metric]:
    """`peak`: the ceiling's matmul FLOP/s per dtype; each row's MFU divides by the peak of its system's precision."""
    params = flops.model_params(shared["model_path"])
    prompt_tokens = shared["mean_prompt_tokens"] * s["rollout_batch"]

    def per_iteration(record) -> float:
        return median_or_none(record.result["iteration_s"])

    def generated(record) -> float:
        return statistics.median(record.result["generated_tokens"])

    def reused_forward(record) -> float:
        """FLOPs of the update's first micro-batch forward, which rlhf-ray's learner ran once, while scoring."""
        reused = record.result.get("reused_first_forward", [0.0])[1:] or [0.0]
        share = min(s["minibatch"], s["rollout_batch"]) / s["rollout_batch"]
        return statistics.median(reused) * flops.forward_flops(
            params["lm"], (prompt_tokens + generated(record)) * share
        )

    def iteration_mfu(record) -> float:
        trl_ppo = record.system.startswith("trl-ppo")  # old log-probs come from generation; a full value model trains
        work = flops.ppo_iteration_flops(
            params, prompt_tokens, generated(record), s["epochs"], full_value_model=trl_ppo, value_forward=not trl_ppo
        )
        peak_of_row = peak.get(dtype_of(record.system))
        return 100 * flops.mfu((work - reused_forward(record)) / per_iteration(record), peak_of_row)

    def update_mfu(record) -> float | None:
        if not record.system.startswith("rlhf-ray"):
            return None
        work = s["epochs"] * flops.train_flops(params["lm"], prompt_tokens + generated(record), lora=True)
        work -= reused_forward(record)
        update_s = median_or_none(record.result["phase_s"]["update"][1:])
        return 100 * flops.mfu(work / update_s, peak.get(dtype_of(record.system)))

    return [
        Metric(
            "s_per_iter", "seconds per iteration (median, end to end, first dropped)", "s", False, safe(per_iteration)
        ),
        Metric(
            "gen_tokens_per_s",
            "generated tokens/s during generation",
            "tokens/s",
            True,
            safe(lambda r: r.result["gen_tokens_per_s"]),
        ),
        Metric(
            "tokens_per_iter",
            "generated tokens per iteration (median; the work each side did)",
            "tokens",
            True,
            safe(generated),
            compare=False,
        ),
        Metric("mfu", "MFU of the whole iteration (see FLOP counting)", "%", True, safe(iteration_mfu)),
        Metric(
            "update_mfu",
            "MFU of rlhf-ray's update phase (LoRA, 4N per token per epoch, less any reused forward; over the peak "
            "of the row's precision)",
            "%",
            True,
            safe(update_mfu),
        ),
        *wall_time_metrics("run_ppo / trainer set-up + train"),
    ]


def ppo(ctx: Context, precision: str = "fp32") -> dict:
    """In fp32, rlhf-ray against TRL PPOTrainer and RLOOTrainer; in bf16 (the ppo-bf16 suite), rlhf-ray bf16 against
    its own fp32 and TRL PPOTrainer bf16, side by side."""
    name = "ppo" if precision == "fp32" else f"ppo-{precision}"
    s = sizes("ppo", ctx.quick)
    shared = prep_prompts(ctx, name, s, reward_model=True)
    settings = ppo_settings(s, shared, ctx, precision)
    print_settings(name, settings)
    trl_spec = {
        "model_path": shared["model_path"],
        "reward_model": str(ctx.work / "reward-model"),
        "data": shared["data"],
        "rollout_batch": s["rollout_batch"],
        "minibatch": s["minibatch"],
        "epochs": s["epochs"],
        "max_new_tokens": s["max_new_tokens"],
        "iterations": s["iterations"],
        "lr": s["lr"],
        "kl_coef": s["kl_coef"],
        "lora_r": s["lora_r"],
        "lora_alpha": s["lora_alpha"],
        "lora_target_modules": LORA_TARGETS,
    }

    def ours(system: str, run_precision: str) -> System:
        return System(
            system,
            "bench.workers.ppo_rlhf",
            lambda i: {
                "config": "configs/demo.yaml",
                "overrides": ppo_overrides(
                    s, ctx, f"bench-{name}-{system}-{i}", shared, s["rollout_batch"], precision=run_precision
                ),
            },
        )

    def trl(system: str, trainer: str, bf16: bool) -> System:
        return System(
            system, "bench.workers.rl_trl", lambda i: {**trl_spec, "trainer": trainer, "bf16": bf16}, trl_env()
        )

    if precision == "fp32":
        systems = [ours("rlhf-ray", "fp32"), trl("trl-ppo", "ppo", False), trl("trl-rloo", "rloo", False)]
    else:
        systems = [ours("rlhf-ray-bf16", "bf16"), ours("rlhf-ray-fp32", "fp32"), trl("trl-ppo-bf16", "ppo", True)]
    runs = ctx.alternate(name, systems)
    names = [system.name for system in systems]
    rows = table(runs, names, ppo_metrics(s, shared, ctx.peak))
    seconds, update_mfu = row(rows, "s_per_iter"), row(rows, "update_mfu")["values"][names[0]]["median"]
    if precision == "fp32":
        targets = [
            target("PPO seconds per iteration >= 2x faster than TRL PPOTrainer", seconds["advantage"]["trl-ppo"], 2.0),
            target("PPO update phase (rlhf-ray, LoRA) >= 40% of fp32 matmul peak", update_mfu, 40.0, "%"),
        ]
    else:
        targets = [
            target("PPO bf16 iteration >= 1.5x faster than rlhf-ray fp32", seconds["advantage"]["rlhf-ray-fp32"], 1.5),
            target(
                "PPO bf16 iteration >= 2x faster than TRL PPOTrainer bf16", seconds["advantage"]["trl-ppo-bf16"], 2.0
            ),
            target("PPO bf16 update phase (rlhf-ray, LoRA) >= 25% of bf16 matmul peak", update_mfu, 25.0, "%"),
        ]
    return {
        "suite": name,
        "dtypes": sorted({dtype_of(n) for n in names}),
        "settings": settings,
        "systems": names,
        "runs": [r.to_dict() for r in runs],
        "rows": rows,
        "targets": targets,
    }


def grpo_overrides(s: dict, ctx: Context, name: str, shared: dict, estimator: str) -> list[str]:
    """The ppo suite's overrides with the batch as prompts x group, and GRPO's objective: KL as a k3 loss term."""
    return [
        *ppo_overrides(s, ctx, name, shared, s["rollout_batch"]),
        f"ppo.rollout_batch_size={s['rollout_batch'] // s['group']}",
        f"ppo.responses_per_prompt={s['group']}",
        f"ppo.minibatch_size={s['minibatch']}",
        f"ppo.advantage_estimator={estimator}",
        "ppo.kl_in=loss",
        "ppo.kl_estimator=k3",
        "ppo.loss_aggregation=token-mean",
    ]


def grpo(ctx: Context) -> dict:
    """rlhf-ray GRPO against TRL's GRPOTrainer on one workload; rlhf-ray's PPO with a value head on the same
    batch shows what the critic costs."""
    s = {**sizes("ppo", ctx.quick), **sizes("grpo", ctx.quick)}
    shared = prep_prompts(ctx, "grpo", s, reward_model=True)
    batch, group = s["rollout_batch"], s["group"]
    settings = {
        **ppo_settings(s, shared, ctx),
        "responses per iteration": f"{batch} ({batch // group} prompts x {group}) for every system",
        "objective": "clipped ratio 0.2, KL to the reference as a k3 loss term (TRL beta), token-mean loss "
        "(TRL loss_type dapo), advantages scaled by the group std (TRL scale_rewards group)",
        "rlhf-ray run (CLI equivalent of repeat 1)": cli("ppo", grpo_overrides(s, ctx, "bench-grpo-0", shared, "grpo")),
    }
    print_settings("grpo", settings)
    trl_spec = {
        "model_path": shared["model_path"],
        "reward_model": str(ctx.work / "reward-model"),
        "data": shared["data"],
        **{key: s[key] for key in ("rollout_batch", "minibatch", "epochs", "max_new_tokens", "iterations", "lr")},
        **{key: s[key] for key in ("kl_coef", "lora_r", "lora_alpha", "group")},
        "lora_target_modules": LORA_TARGETS,
    }

    def ours(estimator: str) -> System:
        return System(
            f"rlhf-ray-{estimator}",
            "bench.workers.ppo_rlhf",
            lambda i: {
                "config": "configs/demo.yaml",
                "overrides": grpo_overrides(s, ctx, f"bench-grpo-{estimator}-{i}", shared, estimator),
            },
        )

    systems = [
        ours("grpo"),
        System("trl-grpo", "bench.workers.rl_trl", lambda i: {**trl_spec, "trainer": "grpo"}, trl_env()),
        ours("gae"),
    ]
    runs = ctx.alternate("grpo", systems)
    names = [system.name for system in systems]
    metrics = [m for m in ppo_metrics(s, shared, ctx.peak) if m.key not in ("mfu", "update_mfu")]
    rows = table(runs, names, metrics)
    update_s = {
        name: median_or_none(
            [median_or_none(r.result["phase_s"]["update"][1:]) for r in runs if r.system == name and r.ok]
        )
        for name in ("rlhf-ray-grpo", "rlhf-ray-gae")
    }
    targets = [
        target(
            "GRPO seconds per iteration >= 2x faster than TRL GRPOTrainer",
            row(rows, "s_per_iter")["advantage"]["trl-grpo"],
            2.0,
        ),
    ]
    return {
        "suite": "grpo",
        "settings": settings,
        "systems": names,
        "runs": [r.to_dict() for r in runs],
        "rows": rows,
        "update_s": update_s,
        "targets": targets,
    }


def scaling_point(runs: list, batch: int, replicas: int) -> dict:
    mine = [r for r in runs if r.system == f"b{batch}-r{replicas}" and r.ok]
    s_iter = median_or_none([median_or_none(r.result["iteration_s"]) for r in mine])
    phases = {p: median_or_none([median_or_none(r.result["phase_s"][p][1:]) for r in mine]) for p in PHASES}
    return {
        "batch": batch,
        "replicas": replicas,
        "s_per_iter": s_iter,
        "phases_s": phases,
        "responses_per_s": batch / s_iter if s_iter else None,
        "gen_tokens_per_s": median_or_none([r.result["gen_tokens_per_s"] for r in mine]),
    }


def scaling(ctx: Context) -> dict:
    s = {**sizes("ppo", ctx.quick), **sizes("scaling", ctx.quick)}
    shared = prep_prompts(ctx, "scaling", s, reward_model=True)
    shapes = [(b, 1) for b in s["batches"]] + [(s["replica_batch"], r) for r in s["replicas"] if r != 1]
    settings = {
        "policy": shared["model_path"],
        "prompts": shared["summary"],
        "shapes (batch, generator replicas)": shapes,
        "iterations": f"{s['iterations']} (the first is dropped)",
        "other settings": "as the ppo suite",
        "CPUs per actor": {r: actor_cpus(r, s["actor_num_cpus"]) for r in sorted({r for _, r in shapes})},
    }
    print_settings("scaling", settings)
    runs = []
    for repeat in range(ctx.repeats["scaling"]):
        for batch, replicas in shapes:
            name = f"b{batch}-r{replicas}"
            runs.append(
                ctx.run(
                    "scaling",
                    System(
                        name,
                        "bench.workers.ppo_rlhf",
                        lambda i, b=batch, r=replicas, n=name: {
                            "config": "configs/demo.yaml",
                            "overrides": ppo_overrides(s, ctx, f"bench-scaling-{n}-{i}", shared, b, r),
                        },
                    ),
                    repeat,
                )
            )
    points = [scaling_point(runs, batch, replicas) for batch, replicas in shapes]
    return {
        "suite": "scaling",
        "settings": settings,
        "runs": [r.to_dict() for r in runs],
        "points": points,
        "targets": [],
    }
