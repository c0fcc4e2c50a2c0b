"""RolloutGenerator: a vLLM engine over the SFT weights that samples responses with the newest policy.

The learner's policy reaches the engine one of two ways (`ppo.weight_sync`):
- `merged`: the learner folds its LoRA adapter into the weights it touches, and the engine reloads
  those tensors in place (`load_merged_weights`); generation then runs without any LoRA kernels.
- `adapter`: the engine serves the LoRA adapter itself (`load_adapter`), a new LoRA id per version.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from rlhf_ray.models.precision import resolve_precision
from rlhf_ray.wire import AdapterPayload, MergedWeights, Rollout, SamplingSpec


def narrowing_load_warnings(record: logging.LogRecord) -> bool:
    """A logging filter: False for vLLM's "Attempted to load weight ... with dtype" warnings."""
    return not str(record.msg).startswith("Attempted to load weight %s with dtype")


class RolloutGenerator:
    """`load_adapter` and `load_merged_weights` switch the policy without restarting vLLM.

    Every adapter load gets a fresh LoRA id: vLLM caches adapters by id, and a learner restored from
    a checkpoint may publish a version number again with different weights. Use one of the two
    methods per engine: an adapter on top of merged weights would apply the update twice.
    """

    def __init__(
        self,
        model_path: str,
        *,
        max_lora_rank: int,
        max_model_len: int,
        dtype: str = "float32",
        enforce_eager: bool = True,
        kv_cache_gib: float = 1.0,
        gpu_memory_utilization: float = 0.3,
        tensor_parallel_size: int = 1,
        seed: int = 0,
        trust_remote_code: bool = False,
        enable_lora: bool = True,
        threads: int | None = None,
        threads_shared_by: int = 1,
        precision: str = "fp32",
    ):
        import torch

        # bf16 where the learner computes in bf16 (same device kind, same model.precision), so the two agree
        chosen = resolve_precision(precision, "cuda" if torch.cuda.is_available() else "cpu")
        dtype = chosen.vllm_dtype or dtype
        print(f"[generator] vLLM dtype {dtype} (precision {chosen.why})", flush=True)
        if chosen.vllm_dtype:  # fp32 checkpoints load into bf16 parameters as asked: one warning per tensor otherwise
            logging.getLogger("vllm.model_executor.models.utils").addFilter(narrowing_load_warnings)

        # The engine core runs in this process, so `load_merged_weights` hands its (name, tensor)
        # pairs straight to the worker (across vLLM's process boundary they would arrive as lists).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

        cpu_only = {}
        if not torch.cuda.is_available():  # vLLM's CPU backend settings; set before vLLM starts
            # vLLM computes with the torch threads the process has when it starts (and then blocks changes).
            # Ray gives an actor with fewer than 2 CPUs one thread; generation runs while the other actors
            # wait, so take `threads`, by default the cores this process may use split between the
            # `threads_shared_by` generators that may share them (more threads than cores stalls all of them).
            torch.set_num_threads(threads or max(1, len(os.sched_getaffinity(0)) // threads_shared_by))
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(kv_cache_gib))))
            os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
            # A compiled engine (enforce_eager=False): vllm-cpu 0.32 cannot load its own saved AOT artifact
            # ("'function' object has no attribute 'finalize_loading'") and would compile again at every
            # start; without AOT, later starts reuse inductor's cache and start several times sooner.
            os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
            # A prompt prefilled in chunks makes vLLM rewind its per-request seeded generator, which
            # CPU generators cannot do ("CPU Generator does not use offset"): prefill whole prompts.
            cpu_only = {"enable_chunked_prefill": False, "max_num_batched_tokens": max(max_model_len, 8192)}
        from vllm import LLM

        lora = {"enable_lora": True, "max_lora_rank": max_lora_rank, "max_loras": 1} if enable_lora else {}
        # Sharded over several GPUs, the engine's workers are processes of their own on this actor's GPUs.
        sharded = {"tensor_parallel_size": tensor_parallel_size, "distributed_executor_backend": "mp"}
        self.llm = LLM(
            model=model_path,
            dtype=dtype,
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            trust_remote_code=trust_remote_code,
            **lora,
            **cpu_only,
            **(sharded if tensor_parallel_size > 1 else {}),
        )
        # vLLM warns about every layer a reload leaves alone (from `reload.inplace` and `reload.layerwise`);
        # `load_merged_weights` sends only the touched modules. (Set once the engine has started: set before
        # it, the warnings still appeared.)
        logging.getLogger("vllm.model_executor.model_loader.reload").setLevel(logging.ERROR)
        self.enable_lora = enable_lora
        self.adapter_root = Path(tempfile.mkdtemp(prefix="rlhf-ray-adapters-"))
        self.version = 0  # 0 = the SFT weights alone
        self._lora = None
        self._loads = 0

    def load_adapter(self, version: int, adapter: AdapterPayload | str | Path) -> int:
        """Use `adapter` (its files, or a folder holding them) for every later generate call."""
        from vllm.lora.request import LoRARequest

        if not self.enable_lora:
            raise RuntimeError(
                "this generator was started without LoRA (ppo.weight_sync=merged); "
                "use load_merged_weights, or start it with enable_lora=True"
            )
        self._loads += 1
        folder = self.adapter_root / f"load{self._loads}-v{version}"
        shutil.rmtree(folder, ignore_errors=True)
        if isinstance(adapter, (str, Path)):
            shutil.copytree(adapter, folder)
        else:
            adapter.write(folder)
        # LoRA ids must be >= 1; vLLM evicts the least recently used adapter when its slots are full.
        if self._lora is not None:  # vLLM reads an adapter's files when it first serves it; the old one is done
            shutil.rmtree(self._lora.lora_path, ignore_errors=True)
        self._lora = LoRARequest(f"policy-v{version}-load{self._loads}", self._loads, str(folder))
        self.version = version
        return self.version

    def load_merged_weights(self, version: int, weights: MergedWeights) -> int:
        """Overwrite the engine's copies of the tensors in `weights` in place.

        Cached prompt prefixes were computed with the old weights, so the prefix cache is emptied.
        """
        self.llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": list(weights.tensors.items()), "is_checkpoint_format": True}
        )
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM could not empty its prefix cache after a weight reload")
        self._lora = None
        self.version = version
        return self.version

    def generate(
        self, prompt_token_ids: list[list[int]], sampling: SamplingSpec, index_offset: int = 0
    ) -> list[Rollout]:
        """Sample `sampling.n` responses per prompt. Prompt i is seeded from (sampling.seed, index_offset + i),
        so a batch split across replicas samples what one generator would."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [
            SamplingParams(
                n=sampling.n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_new_tokens,
                logprobs=0,
                seed=None if sampling.seed is None else sampling.seed * 100_003 + index_offset + i,
            )
            for i in range(len(prompt_token_ids))
        ]
        prompts = [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_token_ids]
        outputs = self.llm.generate(prompts, params, lora_request=self._lora, use_tqdm=False)
        rollouts = []
        for index, output in enumerate(outputs):
            for sample in output.outputs:
                ids = list(sample.token_ids)
                logprobs = [step[token].logprob for step, token in zip(sample.logprobs or [], ids)]
                rollouts.append(Rollout(index, ids, logprobs, sample.finish_reason == "stop"))
        return rollouts

    def compute_threads(self) -> dict:
        """The torch threads this engine computes with, and the OMP_NUM_THREADS Ray gave the process."""
        import torch

        return {"torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}

    def current_version(self) -> int:
        return self.version
