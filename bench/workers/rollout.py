"""rollout suite: rlhf-ray's RolloutGenerator (vLLM CPU build, in this process) vs batched transformers generate.

Same prompt tokens, temperature 1, top-p 1, no top-k, same max_new_tokens, same dtype (spec["dtype"]). Tokens/s counts
real generated tokens only (up to and including EOS) over the wall time of the generate call,
prompt prefill included. One untimed warm-up call first. Every call gets prompts no earlier call
had, so vLLM's prefix cache holds nothing of them beyond the shared chat-template header.
The vLLM engine starts as PPO's default weight sync (`ppo.weight_sync=merged`) starts it: without
LoRA support. With `enable_lora` it starts as `ppo.weight_sync=adapter` does, measures with no
adapter, then loads a zero LoRA adapter (as that mode always has one loaded) and measures the same
batch sizes again on fresh prompts.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from bench.workers._io import main


def batch_of(prompts: list[list[int]], start: int, size: int) -> list[list[int]]:
    """`size` prompts from `start` on (wrapping only when the set is too small, as in smoke runs)."""
    return [prompts[(start + i) % len(prompts)] for i in range(size)]


def zero_lora_adapter(spec: dict, folder: Path) -> Path:
    """A PEFT LoRA adapter like the PPO learner's first one (B = 0, so outputs are unchanged)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(spec["model_path"])
    config = LoraConfig(
        r=spec["lora_r"],
        lora_alpha=2 * spec["lora_r"],
        target_modules=spec["lora_target_modules"],
        task_type="CAUSAL_LM",
    )
    get_peft_model(base, config).save_pretrained(str(folder))
    return folder


def vllm_engine(spec: dict):
    """generate(prompts, max_new_tokens) on a RolloutGenerator; generate.use_lora() loads a zero adapter for
    later calls."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process, as the component tests do
    from actors.rollout_generator import RolloutGenerator
    from rlhf_ray.wire import SamplingSpec

    generator = RolloutGenerator(
        spec["model_path"],
        max_lora_rank=spec["lora_r"],
        max_model_len=spec["max_model_len"],
        dtype=spec["dtype"],
        enforce_eager=spec["enforce_eager"],
        kv_cache_gib=spec["kv_cache_gib"],
        seed=0,
        enable_lora=spec["enable_lora"],
    )

    def generate(prompts: list[list[int]], max_new_tokens: int) -> tuple[int, int]:
        rollouts = generator.generate(prompts, SamplingSpec(max_new_tokens, temperature=1.0, top_p=1.0, seed=0))
        return sum(len(r.token_ids) for r in rollouts), sum(r.finished for r in rollouts)

    def use_lora() -> None:
        with tempfile.TemporaryDirectory(prefix="bench-lora-") as folder:
            generator.load_adapter(1, str(zero_lora_adapter(spec, Path(folder))))  # copied by the generator

    generate.use_lora = use_lora
    return generate


def hf_engine(spec: dict, eos_id: int, pad_id: int):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=getattr(torch, spec["dtype"])).eval()
    torch.manual_seed(0)

    def generate(prompts: list[list[int]], max_new_tokens: int) -> tuple[int, int]:
        width = max(map(len, prompts))
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos_id,
                pad_token_id=pad_id,
            )
        new = out[:, width:]
        is_eos = new == eos_id
        finished = is_eos.any(1)
        real = torch.where(
            finished, is_eos.int().argmax(1) + 1, torch.full_like(finished, new.shape[1], dtype=torch.long)
        )
        return int(real.sum()), int(finished.sum())

    return generate


def timed_batches(generate, prompts: list[list[int]], start: int, spec: dict, label: str) -> tuple[dict, int]:
    """One generate call per batch size, each on prompts no earlier call had; tokens/s per batch."""
    found = {}
    for size in spec["batches"]:
        t0 = time.perf_counter()
        tokens, finished = generate(batch_of(prompts, start, size), spec["max_new_tokens"])
        seconds = time.perf_counter() - t0
        start += size
        found[str(size)] = {
            "seconds": seconds,
            "tokens": tokens,
            "finished": finished,
            "tokens_per_s": tokens / seconds,
        }
        print(
            f"[rollout] {label} batch {size}: {tokens} tokens in {seconds:.1f} s = {tokens / seconds:.1f} tokens/s",
            flush=True,
        )
    return found, start


def run(spec: dict) -> dict:
    data = json.loads(Path(spec["data"]).read_text())
    start = time.perf_counter()
    if spec["engine"] == "vllm":
        generate = vllm_engine(spec)
    else:
        generate = hf_engine(spec, data["eos_token_id"], data["pad_id"])
    out: dict = {"startup_s": time.perf_counter() - start}
    prompts = data["token_ids"]
    generate(batch_of(prompts, len(prompts) - 4, 4), 8)  # warm-up, on the last prompts of the set
    out["by_batch"], used = timed_batches(generate, prompts, 0, spec, spec["engine"])
    if spec["engine"] == "vllm" and spec["enable_lora"]:  # as in PPO's adapter mode, where one is always loaded
        generate.use_lora()
        generate(batch_of(prompts, len(prompts) - 8, 4), 8)  # warm-up with the adapter
        out["by_batch_lora"], _ = timed_batches(generate, prompts, used, spec, "vllm + LoRA adapter")
    return out


if __name__ == "__main__":
    main(run)
