"""The one configuration of an rlhf-ray run: nested dataclasses, loaded from YAML.

`load_config("configs/demo.yaml", ["ppo.kl_coef=0.05"])` gives a validated
`Config`; unknown keys and wrong types are errors naming the key and the file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from rlhf_ray import typed_yaml
from rlhf_ray.formats.names import FORMATS_OF_KIND, Format
from rlhf_ray.typed_yaml import ConfigError

Dtype = Literal["float32", "bfloat16", "float16", "auto"]


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass
class ModelConfig:
    name_or_path: str = "smollm2-135m-instruct"  # a known name (`rlhf-ray models list`) or a local HF folder
    tokenizer: str | None = None  # tokenizer folder; None = same as the model
    dtype: Dtype = "float32"  # weights/compute dtype; bfloat16 on hardware that has it
    trust_remote_code: bool = False  # run code shipped with a model folder; off unless you trust it
    gradient_checkpointing: bool = False  # trade compute for activation memory
    # Every stage: fp32, or bf16-mixed (fp32 weights and optimizer state, bf16 matmuls through torch.autocast;
    # losses, log-probs, KL and rewards in fp32; the vLLM generator in bf16). auto = bf16-mixed where the
    # device has native bf16 matmuls (a CPU with AMX or AVX512-BF16, a GPU with bf16), else fp32; each
    # process decides for its own device and prints its choice. The SFT/RM DeepSpeed jobs on GPUs follow
    # deepspeed.bf16 (default: bf16 where the GPU supports it).
    precision: Literal["fp32", "bf16-mixed", "auto"] = "fp32"
    # SFT/RM: train only the top N transformer layers (with the final norm and the head); the embeddings and
    # the layers below stay frozen, so no gradient is computed under them. None = every layer.
    trainable_layers: int | None = None

    def __post_init__(self):
        _check(
            self.trainable_layers is None or self.trainable_layers > 0,
            f"trainable_layers must be > 0 (or null for all), got {self.trainable_layers}",
        )


@dataclass
class LoraConfig:
    enabled: bool = False  # train a LoRA adapter instead of all weights (PPO policy always uses LoRA)
    r: int = 16  # adapter rank
    alpha: int = 32  # scaling numerator (scale = alpha / r)
    dropout: float = 0.0  # dropout on the adapter input
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def __post_init__(self):
        _check(self.r > 0, f"r must be > 0, got {self.r}")
        _check(self.alpha > 0, f"alpha must be > 0, got {self.alpha}")
        _check(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        _check(len(self.target_modules) > 0, "target_modules must not be empty")


@dataclass
class DeepSpeedConfig:
    config_file: str = (
        "configs/deepspeed/zero2.json"  # DeepSpeed JSON; batch sizes and lr are filled from the stage config
    )
    zero_stage: int | None = None  # override the file's ZeRO stage (0-3)
    bf16: bool | None = None  # None = bf16 only where the hardware supports it

    def __post_init__(self):
        _check(self.zero_stage is None or 0 <= self.zero_stage <= 3, f"zero_stage must be 0..3, got {self.zero_stage}")


@dataclass
class DatasetConfig:
    path: str = ""  # .jsonl / .jsonl.gz file, folder of them, or a Hugging Face hub dataset name
    format: Literal["auto", Format] = "auto"
    split: str = "train"  # split name when `path` is a hub dataset
    limit: int | None = None  # use only the first N valid rows

    def __post_init__(self):
        _check(self.limit is None or self.limit > 0, f"limit must be > 0, got {self.limit}")


@dataclass
class DataConfig:
    sft: DatasetConfig = field(default_factory=lambda: DatasetConfig("data/demo/sft.jsonl", "prompt-completion"))
    preference: DatasetConfig = field(default_factory=lambda: DatasetConfig("data/demo/pairs.jsonl", "pairs"))
    prompts: DatasetConfig = field(default_factory=lambda: DatasetConfig("data/demo/prompts.jsonl", "prompts"))
    max_length: int = 256  # prompt + response tokens
    max_prompt_length: int = 192  # prompt tokens (PPO rollouts, and the left-truncation budget)
    overlong: Literal["error", "skip", "truncate_prompt"] = (
        "error"  # what to do with a sequence over max_length; always counted
    )
    on_bad_row: Literal["error", "skip"] = "error"  # a malformed row stops the run, or is skipped and counted
    # Held-out prompts, chosen by a seeded hash of each prompt (the same prompt is in the same split in every
    # stage and file; see formats/splits.py). eval: each stage's own evaluation (SFT eval loss, RM accuracy),
    # and PPO never samples them. test: `rlhf-ray eval policy` and the pipeline's eval stage; no stage trains on them.
    eval_fraction: float = 0.1
    test_fraction: float = 0.1
    train_part: Literal["all", "a", "b"] = "all"  # train on all training prompts, or one of two disjoint seeded halves
    seed: int = 0  # split / shuffle seed

    def __post_init__(self):
        _check(self.max_length > 0, f"max_length must be > 0, got {self.max_length}")
        _check(
            0 < self.max_prompt_length < self.max_length,
            f"max_prompt_length must be > 0 and < max_length ({self.max_length}) to leave room for a response, "
            f"got {self.max_prompt_length}",
        )
        for kind in ("sft", "preference", "prompts"):  # the section name is the kind of example it is read as
            allowed = ("auto", *FORMATS_OF_KIND[kind])
            fmt = getattr(self, kind).format
            _check(fmt in allowed, f"{kind}.format {fmt!r} cannot be read as {kind} data; use one of {list(allowed)}")
        for name in ("eval_fraction", "test_fraction"):
            _check(0.0 <= getattr(self, name) < 1.0, f"{name} must be in [0, 1), got {getattr(self, name)}")
        _check(
            self.eval_fraction + self.test_fraction < 1.0,
            f"eval_fraction + test_fraction must be < 1 to leave prompts to train on, got "
            f"{self.eval_fraction} + {self.test_fraction}",
        )


@dataclass
class TrainStageConfig:
    """Shared by the SFT and RM Ray Train jobs."""

    epochs: int = 1  # passes over the training split
    max_steps: int | None = None  # stop after this many optimizer steps (None = run all epochs)
    batch_size: int = 8  # sequences (SFT) or pairs (RM) per worker per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    # Sequences (SFT) or pairs (RM) per padded forward pass: a micro-batch is sorted by length and cut into
    # chunks that each pad only to their own longest row (same loss and gradient, less padding). 0 = one pass.
    # (SFT with `packing` runs its packed rows in one pass.)
    chunk_size: int = 4
    lr: float = 1e-5  # peak learning rate
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03  # linear warmup share of total steps, then cosine decay
    max_grad_norm: float = 1.0  # gradient clipping
    eval_every: int = 50  # optimizer steps between evaluations (0 = only at the end)
    checkpoint_every: int = 50  # optimizer steps between Ray Train checkpoints (0 = only at the end)
    num_to_keep: int = 2  # checkpoints kept
    max_failures: int = 1  # worker-group restarts Ray Train may do before giving up
    log_every: int = 1  # optimizer steps between metric lines

    def __post_init__(self):
        for name in ("epochs", "batch_size", "grad_accum", "num_to_keep", "log_every"):
            _check(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        _check(self.max_steps is None or self.max_steps > 0, f"max_steps must be > 0, got {self.max_steps}")
        _check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _check(0.0 <= self.warmup_ratio < 1.0, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        _check(self.eval_every >= 0 and self.checkpoint_every >= 0, "eval_every and checkpoint_every must be >= 0")
        _check(self.max_failures >= 0, f"max_failures must be >= 0, got {self.max_failures}")
        _check(self.chunk_size >= 0, f"chunk_size must be >= 0, got {self.chunk_size}")


@dataclass
class SFTConfig(TrainStageConfig):
    lr: float = 2e-5
    # Pack a micro-batch's sequences (first-fit decreasing) into rows no longer than its longest sequence, each
    # attending only to itself (block-diagonal causal mask, positions restarting): same loss, less padding.
    packing: bool = True


@dataclass
class RMConfig(TrainStageConfig):
    lr: float = 1e-5
    margin: float = 0.0  # loss is -log sigmoid(r_chosen - r_rejected - margin)
    # Run the prompt a pair's two sequences share once: one row of [prompt, rest of chosen, rest of rejected] whose
    # attention mask keeps the two continuations apart. Same scores and gradients, fewer tokens computed.
    shared_prompt: bool = True


@dataclass
class PPOConfig:
    policy_model: str | None = None  # starting policy; None = this run's SFT model if exported, else model.name_or_path
    reward_model: str | None = None  # RM folder; None = this run's RM model (rm/model)
    iterations: int = 20  # experience-collection + update rounds
    rollout_batch_size: int = 16  # prompts per iteration
    responses_per_prompt: int = 1  # samples per prompt (the batch holds rollout_batch_size * this responses)
    max_new_tokens: int = 48  # response length cap
    temperature: float = 1.0
    top_p: float = 1.0
    kl_coef: float = 0.05  # weight of the per-token KL penalty to the reference policy
    kl_estimator: Literal["k1", "k3"] = "k1"  # per-token KL estimate (k1: log-ratio; k3: unbiased, non-negative)
    adaptive_kl: bool = False  # adapt kl_coef towards target_kl (Ziegler et al. 2019)
    target_kl: float = 6.0  # target KL (nats per sequence) for the adaptive controller
    kl_horizon: int = 10000  # adaptive controller horizon, in samples
    gamma: float = 1.0  # discount
    lam: float = 0.95  # GAE lambda
    clip_range: float = 0.2  # policy ratio clip
    clip_range_value: float = 0.2  # value prediction clip
    vf_coef: float = 0.1  # value-loss weight
    ppo_epochs: int = 2  # passes over each batch of experience
    minibatch_size: int = 8  # sequences per PPO minibatch (one optimizer step)
    micro_batch_size: int | None = None  # sequences per forward/backward; None = minibatch_size (no accumulation)
    whiten_advantages: bool = True  # normalise advantages to mean 0, std 1 over the batch
    lr: float = 1e-5  # policy (LoRA + value head) learning rate
    max_grad_norm: float = 1.0
    reward_clip: float = 10.0  # clip normalised rewards to [-reward_clip, reward_clip]
    normalize_reward: bool = True  # use the RM's saved mean/std
    sample_every: int = 5  # iterations between saved sample generations
    checkpoint_every: int = 5  # iterations between checkpoints
    # False: vLLM compiles the model (torch.compile on CPU, CUDA graphs on GPU). On the 2-core CPU machine
    # that costs SmolLM2-135M ~50 s at the first start and ~18 s at later ones (inductor's on-disk cache),
    # and generation then runs 1.15-1.2x faster (bench rollout suite). True skips it: for short runs and
    # tests. With LoRA support (ppo.weight_sync=adapter) vLLM's CPU backend always runs eager.
    vllm_enforce_eager: bool = False
    vllm_kv_cache_gib: float = 1.0  # CPU KV-cache size (VLLM_CPU_KVCACHE_SPACE); on GPU see vllm_gpu_memory_utilization
    vllm_gpu_memory_utilization: float = 0.3  # share of GPU memory vLLM may take (GPU only)
    max_nonfinite_in_a_row: int = 3  # stop after this many consecutive updates skipped for NaN/inf
    # torch: plain AdamW in the learner actor (CPU default). deepspeed: the learner's optimizer runs in a
    # DeepSpeed engine (ZeRO stage 1 or 2 from deepspeed.*, bf16 where the hardware has it); for GPUs.
    learner_backend: Literal["torch", "deepspeed"] = "torch"
    # How the generators get each new policy. merged: the learner folds the LoRA update into the
    # weights it touches and vLLM reloads them in place (no LoRA kernels while generating; vLLM's CPU
    # LoRA path generated 2.8-3.9x slower in the rollout bench). adapter: vLLM serves the LoRA
    # adapter itself (a new LoRA id per version).
    weight_sync: Literal["merged", "adapter"] = "merged"
    # Sample the next batch while the learner updates on this one: one step off-policy (that batch
    # comes from the policy before the update; PPO's ratio is taken against the updated one). Meant for
    # generators and a learner on their own devices; on a few shared CPU cores they contend.
    overlap_generation: bool = False

    def __post_init__(self):
        for name in ("iterations", "rollout_batch_size", "max_new_tokens", "ppo_epochs", "minibatch_size"):
            _check(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        _check(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        _check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        _check(self.kl_coef >= 0, f"kl_coef must be >= 0, got {self.kl_coef}")
        _check(0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "gamma and lam must be in [0, 1]")
        _check(self.clip_range > 0 and self.clip_range_value > 0, "clip ranges must be > 0")
        _check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _check(self.responses_per_prompt > 0, f"responses_per_prompt must be > 0, got {self.responses_per_prompt}")
        _check(
            self.minibatch_size <= self.rollout_batch_size * self.responses_per_prompt,
            "minibatch_size must be <= rollout_batch_size * responses_per_prompt",
        )
        _check(
            self.micro_batch_size is None or 0 < self.micro_batch_size <= self.minibatch_size,
            "micro_batch_size must be in (0, minibatch_size]",
        )
        _check(self.kl_horizon > 0 and self.target_kl > 0, "kl_horizon and target_kl must be > 0")
        _check(
            self.max_nonfinite_in_a_row > 0, f"max_nonfinite_in_a_row must be > 0, got {self.max_nonfinite_in_a_row}"
        )


@dataclass
class ResourcesConfig:
    address: str | None = None  # Ray address; None = RAY_ADDRESS if set, else start a local Ray
    num_workers: int = 2  # Ray Train workers for SFT/RM
    use_gpu: bool = False  # one GPU per Ray Train worker; nccl instead of gloo
    cpus_per_worker: float = 1.0
    generator_replicas: int = 1  # RolloutGenerator actors
    generator_num_gpus: float = 0.0  # GPUs per generator (vLLM)
    learner_num_gpus: float = 0.0
    reward_num_gpus: float = 0.0
    reference_num_gpus: float = 0.0
    actor_num_cpus: float = 0.5  # CPUs reserved per PPO actor
    # torch threads for the PPO update, which runs while the other actors wait: None = every core the learner's
    # node lets it use; a number when other work shares the node (Ray gives an actor with < 2 CPUs one thread).
    learner_update_threads: int | None = None
    # The same for a CPU RolloutGenerator's vLLM engine (fixed at its start); None = the cores it may use divided
    # by generator_replicas, since replicas generate at the same time and may share a node.
    generator_threads: int | None = None
    max_actor_restarts: int = 3  # times PPO re-creates a dead actor of one role before giving up
    call_timeout_s: float = 1800.0  # longest one PPO actor call (generate, score, update, push) may take

    def __post_init__(self):
        _check(self.num_workers > 0, f"num_workers must be > 0, got {self.num_workers}")
        _check(self.generator_replicas > 0, f"generator_replicas must be > 0, got {self.generator_replicas}")
        _check(self.cpus_per_worker > 0 and self.actor_num_cpus >= 0, "CPU counts must be positive")
        _check(self.max_actor_restarts >= 0, f"max_actor_restarts must be >= 0, got {self.max_actor_restarts}")
        _check(self.call_timeout_s > 0, f"call_timeout_s must be > 0, got {self.call_timeout_s}")
        for name in ("learner_update_threads", "generator_threads"):
            _check(
                getattr(self, name) is None or getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}"
            )


@dataclass
class SweepConfig:
    kl_coefs: list[float] = field(default_factory=lambda: [0.02, 0.1])  # values of ppo.kl_coef to try
    lrs: list[float] = field(default_factory=lambda: [5e-6, 2e-5])  # values of ppo.lr to try
    search: Literal["grid", "random"] = "grid"
    num_samples: int = 1  # grid repeats, or random draws
    scheduler: Literal["asha", "none"] = "asha"  # early stopping on reward
    metric: str = "reward_mean"  # the training metric ASHA stops trials on (and the ranking with rank_by: metric)
    mode: Literal["max", "min"] = "max"
    max_concurrent_trials: int = 1
    rank_by: Literal["heldout", "metric"] = "heldout"  # pick the best trial by held-out reward gain, or by `metric`
    kl_budget: float = 5.0  # heldout: trials whose held-out KL to the start exceeds this (nats) rank below the rest
    eval_prompts: int = 32  # heldout: prompts of the eval split each finished trial is evaluated on

    def __post_init__(self):
        _check(len(self.kl_coefs) > 0 and len(self.lrs) > 0, "kl_coefs and lrs must not be empty")
        _check(
            self.num_samples > 0 and self.max_concurrent_trials > 0, "num_samples and max_concurrent_trials must be > 0"
        )
        _check(
            math.isfinite(self.kl_budget) and self.kl_budget > 0,
            f"kl_budget must be a finite number > 0, got {self.kl_budget}",
        )
        _check(self.eval_prompts > 0, f"eval_prompts must be > 0, got {self.eval_prompts}")


@dataclass
class EvalConfig:
    """The pipeline's last stage: `eval policy` of the starting and the PPO policy on the test prompts."""

    enabled: bool = True  # end `rlhf-ray pipeline` with the eval stage
    prompts_limit: int | None = 64  # the first N prompts of the test split (None = all of them)
    samples_per_prompt: int = 1  # responses per prompt and policy
    extra_reward_models: list[str] = field(
        default_factory=list
    )  # judges besides the run's RM (e.g. one trained on the other data half)

    def __post_init__(self):
        _check(
            self.prompts_limit is None or self.prompts_limit > 0, f"prompts_limit must be > 0, got {self.prompts_limit}"
        )
        _check(self.samples_per_prompt > 0, f"samples_per_prompt must be > 0, got {self.samples_per_prompt}")


@dataclass
class RunConfig:
    name: str = "rlhf-run"  # run folder name under output_dir; rerun with the same name to resume
    output_dir: str = "runs"  # local folder or shared storage path for every stage's outputs
    seed: int = 0

    def __post_init__(self):
        _check(bool(self.name) and "/" not in self.name, f"name must be a non-empty folder name, got {self.name!r}")

    @property
    def path(self) -> Path:
        return Path(self.output_dir) / self.name


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        outside = sorted(set(self.lora.target_modules) & {"lm_head", "embed_tokens", "wte", "embed_out"})
        _check(
            self.ppo.weight_sync == "adapter" or not outside,
            f"ppo.weight_sync=merged folds LoRA into decoder-layer weights, but lora.target_modules has {outside} "
            "(tied to the embeddings in many models); use ppo.weight_sync=adapter",
        )


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    return typed_yaml.load(Config, path, overrides)


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config from `to_dict` output (e.g. inside a Ray worker)."""
    return typed_yaml.build(Config, data, typed_yaml.Origin("<dict>"))


def save_config(config: Config, folder: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved config next to a run's outputs."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    target.write_text(typed_yaml.dump(config))
    return target


__all__ = ["Config", "ConfigError", "load_config", "config_from_dict", "save_config"]
