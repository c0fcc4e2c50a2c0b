"""The ceiling suite, the rm and sft suites (rlhf-ray's Ray Train + DeepSpeed job vs TRL's trainer: speed) and the
rm-quality suite (the real-data recipe's reward model vs TRL's RewardTrainer at its defaults: held-out accuracy)."""

from __future__ import annotations

from bench import flops
from bench.common import SHARED_DATA, rel
from bench.context import Context, System
from bench.deps import trl_env
from bench.settings import PRECISION_SETTING, dtype_of, sizes
from bench.summary import Metric, row, safe, table, target, wall_time_metrics


def ceiling(ctx: Context) -> dict:
    spec = sizes("ceiling", ctx.quick)
    record = ctx.run("ceiling", System("torch.matmul", "bench.workers.ceiling", lambda _: spec), 0)
    if not record.ok:
        raise RuntimeError(f"ceiling: the matmul measurement failed:\n{record.error}")
    ctx.peak = record.result["peak_flops"]
    rows = [{"dtype": d, "by_size": record.result["rates"][d], "peak": ctx.peak[d]} for d in spec["dtypes"]]
    return {
        "suite": "ceiling",
        "settings": {**spec, "threads": record.result["threads"]},
        "runs": [record.to_dict()],
        "ceiling": rows,
        "targets": [],
    }


def stage_overrides(suite: str, s: dict, work_dir, name: str, precision: str = "fp32") -> list[str]:
    """configs/demo.yaml plus these: the stage's data, lengths, batch, steps, lr, workers, precision (fp32 or bf16:
    bf16-mixed, fp32 weights and optimizer state with bf16 matmuls)."""
    section = "preference" if suite == "rm" else "sft"
    overrides = [
        f"run.output_dir={work_dir}/runs",
        f"run.name={name}",
        f"data.{section}.path={rel(SHARED_DATA / s['data'])}",
        f"data.{section}.format={s['format']}",
        f"data.max_length={s['max_length']}",
        "data.overlong=truncate_prompt",
        "data.on_bad_row=skip",
        f"data.eval_fraction={s['eval_fraction']}",
        f"{suite}.batch_size={s['batch_per_worker']}",
        f"{suite}.max_steps={s['steps']}",
        f"{suite}.eval_every=0",
        f"{suite}.checkpoint_every=0",
        f"{suite}.lr={s['lr']}",
        f"{suite}.chunk_size={s['chunk_size']}",
        f"resources.num_workers={s['workers']}",
        f"resources.cpus_per_worker={s['cpus_per_worker']}",
        f"deepspeed.zero_stage={s['zero_stage']}",
        "model.dtype=float32",
        f"model.precision={PRECISION_SETTING[precision]}",
    ]
    if s.get("limit"):
        overrides.append(f"data.{section}.limit={s['limit']}")
    return overrides


def training_settings(suite: str, s: dict, shared: dict, ctx: Context, precision: str) -> dict:
    global_batch = s["batch_per_worker"] * s["workers"]
    unit = "pairs" if suite == "rm" else "examples"
    return {
        "model": shared["model_path"],
        "data": rel(SHARED_DATA / s["data"]),
        "rows": shared["summary"],
        "max_length": s["max_length"],
        "steps": s["steps"],
        "lr": s["lr"],
        "global batch": f"{global_batch} {unit} (rlhf-ray: {s['batch_per_worker']} x {s['workers']} Ray Train "
        f"worker(s) with {s['cpus_per_worker']} CPUs each, DeepSpeed ZeRO stage {s['zero_stage']}; "
        "TRL: one process with 2 threads)",
        "padding": "TRL pads each batch to its longest row; rlhf-ray "
        + (
            "packs each micro-batch's sequences (first-fit decreasing) into rows no longer than its "
            "longest sequence, each sequence attending only to itself (sft.packing), and runs the rows in one pass "
            "(same rows per step, same loss); its SFT loss projects only labelled positions to the "
            "vocabulary"
            if suite == "sft"
            else f"sorts each micro-batch by length and runs chunks of {s['chunk_size']} pairs, each padded to "
            "its own longest row (same rows per step, same loss); each pair is one row of [shared prompt, "
            "rest of chosen, rest of rejected] with an attention mask that keeps the two apart "
            f"(rm.shared_prompt), so its prompt is computed once; {shared['computed_share']:.1%} of the "
            "real tokens are computed"
        ),
        "precision": "fp32 on both sides (model.precision=fp32; TRL bf16=False)"
        if precision == "fp32"
        else "bf16 rows: bf16 matmuls over fp32 weights and optimizer state on both sides (rlhf-ray "
        "model.precision=bf16-mixed, torch.autocast; TRL bf16=True, which autocasts the same way); the "
        "rlhf-ray-fp32 row is model.precision=fp32, for the ratio",
        "LoRA": "none (full fine-tuning)",
        "gradient checkpointing": "off on both sides",
        "held-out": f"{shared['n_eval']} {unit} (rlhf-ray's own split, used by both)",
        "rlhf-ray run (CLI equivalent of repeat 1)": cli(
            suite, stage_overrides(suite, s, ctx.work, f"bench-{suite}-0", precision)
        ),
    }


def training_metrics(suite: str, params: int, peak: dict[str, float]) -> list[Metric]:
    """`peak`: the ceiling's matmul FLOP/s per dtype; each row's MFU divides by the peak of its system's precision."""

    def mfu(record) -> float:
        """On the tokens run through the model (TRL's are its real tokens; rlhf-ray's RM runs shared prompts once)."""
        tokens_per_s = record.result.get("computed_tokens_per_s") or record.result["tokens_per_s"]
        return 100 * flops.mfu(flops.train_flops(params, tokens_per_s), peak.get(dtype_of(record.system)))

    metrics = [
        Metric(
            "tokens_per_s",
            "tokens/s (steady state, real tokens)",
            "tokens/s",
            True,
            safe(lambda r: r.result["tokens_per_s"]),
        ),
        Metric(
            "rows_per_s",
            "pairs/s" if suite == "rm" else "examples/s",
            "/s",
            True,
            safe(lambda r: r.result["rows_per_s"]),
        ),
        Metric(
            "mfu",
            f"MFU (6N x tokens computed/s over the matmul peak of the row's precision, N={params / 1e6:.1f}M)",
            "%",
            True,
            safe(mfu),
        ),
        *wall_time_metrics("run_stage / trainer set-up to saved model"),
    ]
    if suite == "rm":
        metrics.append(
            Metric(
                "accuracy", "held-out accuracy after the run", "", True, safe(lambda r: r.result["heldout_accuracy"])
            )
        )
    else:
        metrics.append(
            Metric("eval_loss", "held-out loss after the run", "", False, safe(lambda r: r.result["eval_loss"]))
        )
    return metrics


def training_suite(ctx: Context, suite: str, precision: str = "fp32") -> dict:
    """rm or sft: prepare the shared rows, run rlhf-ray and TRL alternately, tabulate. In fp32, rlhf-ray against TRL;
    in bf16 (the `-bf16` suites), rlhf-ray bf16 against its own fp32 and TRL bf16, side by side."""
    s = sizes(suite, ctx.quick)
    name = suite if precision == "fp32" else f"{suite}-{precision}"
    data_file = ctx.work / f"{name}-rows.json"
    shared = ctx.prep(
        name,
        {
            "kind": suite,
            "config": "configs/demo.yaml",
            "data_out": str(data_file),
            "overrides": stage_overrides(suite, s, ctx.work, f"bench-{name}-prep"),
        },
    )
    settings = training_settings(suite, s, shared, ctx, precision)
    print_settings(name, settings)

    def ours(system: str, run_precision: str) -> System:
        return System(
            system,
            "bench.workers.train_rlhf",
            lambda i: {
                "stage": suite,
                "config": "configs/demo.yaml",
                "data": str(data_file),
                "overrides": stage_overrides(suite, s, ctx.work, f"bench-{name}-{system}-{i}", run_precision),
            },
        )

    def trl(system: str, bf16: bool) -> System:
        return System(
            system,
            "bench.workers.train_trl",
            lambda i: {
                "stage": suite,
                "data": str(data_file),
                "model_path": shared["model_path"],
                "steps": s["steps"],
                "global_batch": s["batch_per_worker"] * s["workers"],
                "lr": s["lr"],
                "max_length": s["max_length"],
                "bf16": bf16,
            },
            trl_env(),
        )

    if precision == "fp32":
        systems = [ours("rlhf-ray", "fp32"), trl("trl", False)]
    else:
        systems = [ours("rlhf-ray-bf16", "bf16"), ours("rlhf-ray-fp32", "fp32"), trl("trl-bf16", True)]
    runs = ctx.alternate(name, systems)
    names = [system.name for system in systems]
    params = flops.model_params(shared["model_path"])["score" if suite == "rm" else "lm"]
    rows = table(runs, names, training_metrics(suite, params, ctx.peak))
    label = "RM" if suite == "rm" else "SFT"
    tokens, mfu = row(rows, "tokens_per_s"), row(rows, "mfu")["values"][names[0]]["median"]
    if precision == "fp32":
        targets = [
            target(f"{label} training tokens/s >= 1.3x TRL", tokens["advantage"]["trl"], 1.3),
            target(f"{label} training (rlhf-ray) >= 40% of fp32 matmul peak", mfu, 40.0, "%"),
        ]
    else:
        targets = [
            target(f"{label} training bf16 tokens/s >= 1.8x rlhf-ray fp32", tokens["advantage"]["rlhf-ray-fp32"], 1.8),
            target(f"{label} training bf16 tokens/s >= 1.3x TRL bf16", tokens["advantage"]["trl-bf16"], 1.3),
            target(f"{label} training bf16 (rlhf-ray) >= 25% of bf16 matmul peak", mfu, 25.0, "%"),
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


def rm_quality(ctx: Context) -> dict:
    """The recipe's reward model (configs/hh-rlhf.yaml) and TRL's RewardTrainer at TRL's defaults, trained on the
    same pairs in the same order, both scored on the recipe's held-out split by the same code (rm_score)."""
    s = sizes("rm-quality", ctx.quick)
    data_file = ctx.work / "rm-quality-rows.json"

    def overrides(name: str) -> list[str]:
        return [
            f"run.output_dir={ctx.work}/runs",
            f"run.name={name}",
            f"rm.max_steps={s['steps']}",
            f"rm.batch_size={s['batch']}",
            f"rm.lr={s['lr']}",
            "rm.eval_every=0",
            "rm.checkpoint_every=0",
            *s["extra_overrides"],
        ]

    shared = ctx.prep(
        "rm-quality",
        {
            "kind": "rm",
            "config": s["config"],
            "data_out": str(data_file),
            "overrides": overrides("bench-rm-quality-prep"),
        },
    )
    settings = {
        "model": shared["model_path"],
        "rows": shared["summary"],
        "pairs trained": s["steps"] * s["batch"],
        "rlhf-ray": f"{s['config']} as committed (its model.precision, model.trainable_layers, data lengths), "
        f"{s['steps']} steps of {s['batch']} pairs, lr {s['lr']}",
        "TRL": f"RewardTrainer at TRL's defaults (bf16 autocast with fp32 weights, gradient checkpointing, every "
        f"layer trained), the same pairs in the same order, lr {s['lr']}, cosine schedule",
        "held-out": f"{shared['n_eval']} pairs of the recipe's eval split, each side's exported model scored in fp32 "
        "by bench/workers/rm_score.py",
        "rlhf-ray run (CLI equivalent)": "`"
        + " ".join(["rlhf-ray", "rm", s["config"], *overrides("bench-rm-quality-0")])
        + "`",
    }
    print_settings("rm-quality", settings)
    rlhf = System(
        "rlhf-ray",
        "bench.workers.train_rlhf",
        lambda i: {
            "stage": "rm",
            "config": s["config"],
            "data": str(data_file),
            "score_heldout": True,
            "overrides": overrides(f"bench-rm-quality-{i}"),
        },
    )
    trl = System(
        "trl",
        "bench.workers.train_trl",
        lambda i: {
            "stage": "rm",
            "data": str(data_file),
            "model_path": shared["model_path"],
            "steps": s["steps"],
            "global_batch": s["batch"],
            "lr": s["lr"],
            "max_length": None,
            "bf16": True,
            "gradient_checkpointing": True,
        },
        trl_env(),
    )
    runs = ctx.alternate("rm-quality", [rlhf, trl])
    rows = table(
        runs,
        ["rlhf-ray", "trl"],
        [
            Metric(
                "accuracy",
                "held-out pairwise accuracy (same scorer)",
                "",
                True,
                safe(lambda r: r.result["heldout_accuracy"]),
            ),
            Metric(
                "job_accuracy",
                "held-out accuracy from rlhf-ray's own end-of-job eval",
                "",
                True,
                safe(lambda r: r.result.get("job_eval_accuracy")),
                compare=False,
            ),
            *wall_time_metrics("run_stage / trainer set-up to saved model"),
        ],
    )
    accuracy = row(rows, "accuracy")
    targets = [
        target("RM held-out accuracy >= TRL RewardTrainer's at the same pairs", accuracy["advantage"]["trl"], 1.0),
        target("RM held-out accuracy >= 0.62", accuracy["values"]["rlhf-ray"]["median"], 0.62, ""),
    ]
    return {
        "suite": "rm-quality",
        "settings": settings,
        "systems": ["rlhf-ray", "trl"],
        "runs": [r.to_dict() for r in runs],
        "rows": rows,
        "targets": targets,
    }


def cli(command: str, overrides: list[str]) -> str:
    """The `rlhf-ray` command line that runs what a worker runs through the Python API."""
    return "`" + " ".join(["rlhf-ray", command, "configs/demo.yaml", *overrides]) + "`"


def print_settings(suite: str, settings: dict) -> None:
    print(f"\n[bench] ===== {suite}: shared workload settings =====", flush=True)
    for key, value in settings.items():
        print(f"[bench]   {key}: {value}", flush=True)
