"""rollout suite: rlhf-ray's RolloutGenerator (vLLM CPU build, in this process) vs batched transformers generate.

Same prompt tokens, temperature 1, top-p 1, no top-k, same max_new_tokens, fp32. Tokens/s counts
real generated tokens only (up to and including EOS) over the wall time of the generate call,
prompt prefill included. One untimed warm-up call first. Every call gets prompts no earlier call
had, so vLLM's prefix cache holds nothing of them beyond the shared chat-template header.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from bench.workers._io import main


def batch_of(prompts: list[list[int]], start: int, size: int) -> list[list[int]]:
    """`size` prompts from `start` on (wrapping only when the set is too small, as in smoke runs)."""
    return [prompts[(start + i) % len(prompts)] for i in range(size)]


def vllm_engine(spec: dict):
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process, as the component tests do
    from actors.rollout_generator import RolloutGenerator, SamplingSpec

    generator = RolloutGenerator(spec["model_path"], max_lora_rank=spec["lora_r"], max_model_len=spec["max_model_len"],
                                 dtype="float32", enforce_eager=spec["enforce_eager"], kv_cache_gib=spec["kv_cache_gib"],
                                 seed=0)

    def generate(prompts: list[list[int]], max_new_tokens: int) -> tuple[int, int]:
        rollouts = generator.generate(prompts, SamplingSpec(max_new_tokens, temperature=1.0, top_p=1.0, seed=0))
        return sum(len(r.token_ids) for r in rollouts), sum(r.finished for r in rollouts)

    return generate


def hf_engine(spec: dict, eos_id: int, pad_id: int):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=torch.float32).eval()
    torch.manual_seed(0)

    def generate(prompts: list[list[int]], max_new_tokens: int) -> tuple[int, int]:
        width = max(map(len, prompts))
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0,
                                 top_k=0, max_new_tokens=max_new_tokens, eos_token_id=eos_id, pad_token_id=pad_id)
        new = out[:, width:]
        is_eos = new == eos_id
        finished = is_eos.any(1)
        real = torch.where(finished, is_eos.int().argmax(1) + 1, torch.full_like(finished, new.shape[1], dtype=torch.long))
        return int(real.sum()), int(finished.sum())

    return generate


def run(spec: dict) -> dict:
    data = json.loads(Path(spec["data"]).read_text())
    start = time.perf_counter()
    if spec["engine"] == "vllm":
        generate = vllm_engine(spec)
    else:
        generate = hf_engine(spec, data["eos_token_id"], data["pad_id"])
    out: dict = {"startup_s": time.perf_counter() - start, "by_batch": {}}
    prompts = data["token_ids"]
    generate(batch_of(prompts, len(prompts) - 4, 4), 8)  # warm-up, on the last prompts of the set
    start = 0
    for size in spec["batches"]:
        t0 = time.perf_counter()
        tokens, finished = generate(batch_of(prompts, start, size), spec["max_new_tokens"])
        start += size
        seconds = time.perf_counter() - t0
        out["by_batch"][str(size)] = {"seconds": seconds, "tokens": tokens, "finished": finished,
                                      "tokens_per_s": tokens / seconds}
        print(f"[rollout] {spec['engine']} batch {size}: {tokens} tokens in {seconds:.1f} s = {tokens / seconds:.1f} tokens/s",
              flush=True)
    return out


if __name__ == "__main__":
    main(run)
