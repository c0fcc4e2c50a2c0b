"""The one configuration of an rlhf-ray run: nested pydantic models, loaded from YAML.

`load_config("configs/demo.yaml", ["ppo.kl_coef=0.05"])` gives a validated
`Config`; unknown keys and wrong types are errors naming the key and the file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from rlhf_ray import typed_yaml
from rlhf_ray.algo.choices import GROUP_ESTIMATORS, AdvantageEstimator, KLEstimator, LossAggregationMode
from rlhf_ray.formats.names import FORMATS_OF_KIND, Format
from rlhf_ray.storage import RunStore, is_uri, local_copy_path
from rlhf_ray.typed_yaml import ConfigError, yaml11_float

Dtype = Literal["float32", "bfloat16", "float16", "auto"]
# YAML 1.1 (PyYAML) reads an exponent without a dot, such as 1e-5, as a string: accepted as a float.
Float = Annotated[float, BeforeValidator(yaml11_float)]


class Section(BaseModel):
    """A config section: unknown keys and wrong types are errors; an empty section (`ppo:`) means defaults."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _empty_is_defaults(cls, data):
        return {} if data is None else data


class ModelConfig(Section):
    name_or_path: str = Field(
        "smollm2-135m-instruct", description="a known name (`rlhf-ray models list`) or a local HF folder"
    )
    tokenizer: str | None = Field(None, description="tokenizer folder; null = same as the model")
    dtype: Dtype = Field(
        "float32", description="weights dtype (bfloat16: the weights themselves in bf16, no fp32 copy)"
    )
    trust_remote_code: bool = Field(False, description="run code shipped with a model folder; off unless you trust it")
    gradient_checkpointing: bool = Field(False, description="trade compute for activation memory")
    precision: Literal["fp32", "bf16-mixed", "auto"] = Field(
        "fp32",
        description=(
            "every stage: fp32, or bf16-mixed (fp32 weights and optimizer state, bf16 matmuls through "
            "torch.autocast; losses, log-probs, KL and rewards in fp32; the vLLM generator in bf16). auto = "
            "bf16-mixed where the device has native bf16 matmuls (a CPU with AMX or AVX512-BF16, a GPU with "
            "bf16), else fp32; each process decides for its own device and prints its choice. On GPUs the "
            "DeepSpeed engines cast to bf16 themselves, as deepspeed.bf16 says where it is set"
        ),
    )
    trainable_layers: int | None = Field(
        None,
        gt=0,
        description=(
            "SFT/RM: train only the top N transformer layers (with the final norm and the head); the embeddings "
            "and the layers below stay frozen. null = every layer"
        ),
    )


class LoraConfig(Section):
    enabled: bool = Field(False, description="train a LoRA adapter instead of all weights (the PPO policy always does)")
    r: int = Field(16, gt=0, description="adapter rank")
    alpha: int = Field(32, gt=0, description="scaling numerator (scale = alpha / r)")
    dropout: Float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter input")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        min_length=1,
        description="module names that get an adapter",
    )


class DeepSpeedConfig(Section):
    config_file: str = Field(
        "configs/deepspeed/zero2.json",
        description="DeepSpeed JSON; batch sizes and lr are filled in from the stage config",
    )
    zero_stage: int | None = Field(None, ge=0, le=3, description="override the file's ZeRO stage (0-3)")
    bf16: bool | None = Field(None, description="DeepSpeed's own bf16 on GPUs; null = as model.precision says")


class DatasetConfig(Section):
    path: str = Field("", description=".jsonl / .jsonl.gz file, folder of them, or a Hugging Face hub dataset name")
    format: Literal["auto", Format] = Field("auto", description="row format; auto = told by the first row's keys")
    split: str = Field("train", description="split name when `path` is a hub dataset")
    limit: int | None = Field(None, gt=0, description="use only the first N valid rows")


class DataConfig(Section):
    sft: DatasetConfig = Field(
        default_factory=lambda: DatasetConfig(path="data/demo/sft.jsonl", format="prompt-completion"),
        description="instruction data for SFT",
    )
    preference: DatasetConfig = Field(
        default_factory=lambda: DatasetConfig(path="data/demo/pairs.jsonl", format="pairs"),
        description="preference pairs for the reward model",
    )
    prompts: DatasetConfig = Field(
        default_factory=lambda: DatasetConfig(path="data/demo/prompts.jsonl", format="prompts"),
        description="prompts PPO samples responses to",
    )
    max_length: int = Field(256, gt=0, description="prompt + response tokens")
    max_prompt_length: int = Field(192, description="prompt tokens (PPO rollouts, and the left-truncation budget)")
    overlong: Literal["error", "skip", "truncate_prompt"] = Field(
        "error", description="what to do with a sequence over max_length; always counted"
    )
    on_bad_row: Literal["error", "skip"] = Field(
        "error", description="a malformed row stops the run, or is skipped and counted"
    )
    eval_fraction: Float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description=(
            "held-out prompts for each stage's own evaluation (SFT eval loss, RM accuracy); PPO never samples them. "
            "Chosen by a seeded hash of each prompt, so a prompt is in the same split in every stage and file"
        ),
    )
    test_fraction: Float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description=(
            "held-out prompts for `rlhf-ray eval policy` and the pipeline's eval stage; no stage trains on them"
        ),
    )
    train_part: Literal["all", "a", "b"] = Field(
        "all", description="train on all training prompts, or on one of two disjoint seeded halves"
    )
    seed: int = Field(0, description="split / shuffle seed")

    @model_validator(mode="after")
    def _consistent(self):
        if not 0 < self.max_prompt_length < self.max_length:
            raise ValueError(
                f"max_prompt_length must be > 0 and < max_length ({self.max_length}) to leave room for "
                f"a response, got {self.max_prompt_length}"
            )
        for kind in ("sft", "preference", "prompts"):  # the section name is the kind of example it is read as
            allowed = ("auto", *FORMATS_OF_KIND[kind])
            fmt = getattr(self, kind).format
            if fmt not in allowed:
                raise ValueError(f"{kind}.format {fmt!r} cannot be read as {kind} data; use one of {list(allowed)}")
        if self.eval_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"eval_fraction + test_fraction must be < 1 to leave prompts to train on, got "
                f"{self.eval_fraction} + {self.test_fraction}"
            )
        return self


class TrainStageConfig(Section):
    """Shared by the SFT and RM Ray Train jobs."""

    epochs: int = Field(1, gt=0, description="passes over the training split")
    max_steps: int | None = Field(None, gt=0, description="stop after this many optimizer steps (null = all epochs)")
    batch_size: int = Field(8, gt=0, description="sequences (SFT) or pairs (RM) per worker per micro-step")
    grad_accum: int = Field(1, gt=0, description="micro-steps per optimizer step")
    chunk_size: int = Field(
        4,
        ge=0,
        description=(
            "sequences (SFT) or pairs (RM) per padded forward pass: a micro-batch is sorted by length and cut into "
            "chunks that each pad only to their own longest row (same loss and gradient, less padding). 0 = one pass "
            "(SFT with `packing` runs its packed rows in one pass)"
        ),
    )
    lr: Float = Field(1e-5, gt=0, description="peak learning rate")
    weight_decay: Float = Field(0.0, ge=0, description="AdamW weight decay")
    warmup_ratio: Float = Field(0.03, ge=0, lt=1, description="linear warmup share of total steps, then cosine decay")
    max_grad_norm: Float = Field(1.0, gt=0, description="gradient clipping")
    eval_every: int = Field(50, ge=0, description="optimizer steps between evaluations (0 = only at the end)")
    checkpoint_every: int = Field(50, ge=0, description="optimizer steps between checkpoints (0 = only at the end)")
    num_to_keep: int = Field(2, gt=0, description="checkpoints kept")
    max_failures: int = Field(1, ge=0, description="worker-group restarts Ray Train may do before giving up")
    log_every: int = Field(1, gt=0, description="optimizer steps between metric lines")
    max_nonfinite_in_a_row: int = Field(
        3,
        gt=0,
        description=(
            "a micro-batch whose loss is NaN/inf adds no gradient and its step is counted (nonfinite_steps); this many "
            "such steps in a row stop the job without exporting"
        ),
    )


class SFTConfig(TrainStageConfig):
    lr: Float = Field(2e-5, gt=0, description="peak learning rate")
    packing: bool = Field(
        True,
        description=(
            "pack a micro-batch's sequences (first-fit decreasing) into rows no longer than its longest sequence, each "
            "attending only to itself (block-diagonal causal mask, positions restarting): same loss, less padding"
        ),
    )


class RMConfig(TrainStageConfig):
    lr: Float = Field(1e-5, gt=0, description="peak learning rate")
    margin: Float = Field(0.0, description="the loss is -log sigmoid(r_chosen - r_rejected - margin)")
    shared_prompt: bool = Field(
        True,
        description=(
            "run the prompt a pair's two sequences share once: one row of [prompt, rest of chosen, rest of rejected] "
            "whose attention mask keeps the two continuations apart. Same scores and gradients, fewer tokens"
        ),
    )


class RewardSourceConfig(Section):
    """One source of the sequence reward; a run's reward is the weighted sum of its sources."""

    kind: Literal["model", "function", "http"] = Field(
        "model",
        description=(
            "model: the trained reward model (ppo.reward_model). function: a Python function (`function`). "
            "http: a remote server (`url`)"
        ),
    )
    weight: Float = Field(1.0, description="this source's weight in the sum")
    function: str | None = Field(
        None,
        description=(
            "kind function: `package.module:function` or `path/to/file.py:function`, called as "
            "f(prompt, response, fields) -> number (see rlhf_ray/rewards/function.py)"
        ),
    )
    batched: bool = Field(False, description="kind function: call it once per batch with lists, not once per row")
    url: str | None = Field(None, description="kind http: the endpoint POSTed to (see rlhf_ray/rewards/http.py)")
    timeout_s: Float = Field(30.0, gt=0, description="kind http: seconds one request may take")
    max_retries: int = Field(3, ge=0, description="kind http: retries after a connection error, timeout or 5xx")
    backoff_s: Float = Field(1.0, ge=0, description="kind http: wait before the first retry, doubling each time")

    @model_validator(mode="after")
    def _has_what_its_kind_needs(self):
        needs = {"function": "function", "http": "url"}.get(self.kind)
        if needs and not getattr(self, needs):
            raise ValueError(f"a reward source of kind {self.kind} needs `{needs}`")
        if self.kind == "function" and ":" not in self.function:
            raise ValueError(f"function {self.function!r}: expected 'package.module:function' or 'file.py:function'")
        if self.kind == "http" and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url {self.url!r}: expected http:// or https://")
        return self

    @property
    def label(self) -> str:
        return {"model": "reward model", "function": f"function {self.function}", "http": f"server {self.url}"}[
            self.kind
        ]


class PPOConfig(Section):
    policy_model: str | None = Field(
        None, description="starting policy; null = this run's SFT model if exported, else model.name_or_path"
    )
    reward_model: str | None = Field(None, description="RM folder; null = this run's RM model (rm/model)")
    iterations: int = Field(20, gt=0, description="experience-collection + update rounds")
    rollout_batch_size: int = Field(16, gt=0, description="prompts per iteration")
    responses_per_prompt: int = Field(
        1, gt=0, description="samples per prompt (the batch holds rollout_batch_size * this responses)"
    )
    max_new_tokens: int = Field(48, gt=0, description="response length cap")
    temperature: Float = Field(1.0, gt=0, description="sampling temperature (log-probs are taken under it)")
    top_p: Float = Field(1.0, gt=0, le=1, description="nucleus sampling")
    kl_coef: Float = Field(0.05, ge=0, description="weight of the per-token KL penalty to the reference policy")
    kl_estimator: KLEstimator = Field(
        "k1",
        description=(
            "per-token KL estimate (k1: log-ratio, unbiased; k2: half its square, biased, low variance; "
            "k3: unbiased, non-negative)"
        ),
    )
    kl_in: Literal["reward", "loss"] = Field(
        "reward",
        description=(
            "reward: kl_coef * KL is subtracted from every token's reward (InstructGPT). loss: the rewards carry no "
            "KL and kl_coef * KL (kl_estimator; k3 is GRPO's choice) is added to the policy loss"
        ),
    )
    adaptive_kl: bool = Field(False, description="adapt kl_coef towards target_kl (Ziegler et al. 2019)")
    target_kl: Float = Field(6.0, gt=0, description="target KL (nats per sequence) for the adaptive controller")
    kl_horizon: int = Field(10000, gt=0, description="adaptive controller horizon, in samples")
    advantage_estimator: AdvantageEstimator = Field(
        "gae",
        description=(
            "gae: PPO with a value head (critic). Critic-free, no value head: grpo (reward minus its prompt's mean, "
            "over the prompt's std), dr_grpo (minus the mean only), rloo (minus the mean of the prompt's other "
            "responses), reinforce_pp (per-token returns whitened over the batch). grpo, dr_grpo and rloo compare "
            "the responses_per_prompt (>= 2) answers to one prompt"
        ),
    )
    gamma: Float = Field(1.0, ge=0, le=1, description="discount")
    lam: Float = Field(0.95, ge=0, le=1, description="GAE lambda")
    clip_range: Float = Field(0.2, gt=0, description="policy ratio clip: the ratio stays in [1 - c, 1 + c]")
    clip_range_low: Float | None = Field(
        None, gt=0, lt=1, description="the ratio's lower clip 1 - this; null = clip_range"
    )
    clip_range_high: Float | None = Field(
        None, gt=0, description="the ratio's upper clip 1 + this; null = clip_range (DAPO's clip-higher: 0.28)"
    )
    loss_aggregation: LossAggregationMode = Field(
        "token-mean",
        description=(
            "how per-token losses make a minibatch's loss. token-mean: over every token of the minibatch (DAPO). "
            "seq-mean-token-mean: each response's token mean, then the mean over responses (GRPO paper). "
            "seq-mean-token-sum-norm: each response's token sum / max_new_tokens, then the mean (Dr. GRPO)"
        ),
    )
    clip_range_value: Float = Field(0.2, gt=0, description="value prediction clip")
    vf_coef: Float = Field(0.1, ge=0, description="value-loss weight")
    ppo_epochs: int = Field(2, gt=0, description="passes over each batch of experience")
    minibatch_size: int = Field(8, gt=0, description="sequences per PPO minibatch (one optimizer step)")
    micro_batch_size: int | None = Field(
        None, gt=0, description="sequences per forward/backward; null = minibatch_size (no accumulation)"
    )
    whiten_advantages: bool = Field(
        True,
        description=(
            "gae: normalise advantages to mean 0, std 1 over the batch (the critic-free estimators normalise, or "
            "deliberately do not, by their own definition)"
        ),
    )
    lr: Float = Field(1e-5, gt=0, description="policy (LoRA, and the value head with gae) learning rate")
    max_grad_norm: Float = Field(1.0, gt=0, description="gradient clipping")
    reward_clip: Float = Field(10.0, gt=0, description="clip normalised rewards to [-reward_clip, reward_clip]")
    normalize_reward: bool = Field(True, description="use the RM's saved mean/std")
    rewards: list[RewardSourceConfig] = Field(
        default_factory=lambda: [RewardSourceConfig()],
        min_length=1,
        description=(
            "the reward's sources, summed with their weights: the trained RM (kind model, at most one), Python "
            "functions and HTTP servers. A run with no model source needs no reward model"
        ),
    )
    dynamic_sampling: bool = Field(
        False,
        description=(
            "DAPO's dynamic sampling: score each sampled batch first, set aside the prompts whose responses all got "
            "the same reward (no advantage for a group estimator), and sample more prompts until rollout_batch_size "
            "informative ones are found or max_sampling_rounds have run (then fill up with set-aside ones). Needs "
            "responses_per_prompt >= 2; not with overlap_generation"
        ),
    )
    max_sampling_rounds: int = Field(3, gt=0, description="dynamic sampling: batches sampled per iteration at most")
    sample_every: int = Field(5, ge=0, description="iterations between saved sample generations (0 = none)")
    checkpoint_every: int = Field(5, ge=0, description="iterations between checkpoints (0 = only at the end)")
    vllm_enforce_eager: bool = Field(
        False,
        description=(
            "false: vLLM compiles the model (torch.compile on CPU, CUDA graphs on GPU): slower to start, faster to "
            "generate (bench rollout suite). true skips it, for short runs and tests. With LoRA support "
            "(ppo.weight_sync=adapter) vLLM's CPU backend always runs eager"
        ),
    )
    vllm_kv_cache_gib: Float = Field(
        1.0, gt=0, description="CPU KV-cache size (VLLM_CPU_KVCACHE_SPACE); on GPU see vllm_gpu_memory_utilization"
    )
    vllm_gpu_memory_utilization: Float = Field(0.3, gt=0, le=1, description="share of GPU memory vLLM may take")
    vllm_tensor_parallel_size: int = Field(
        1,
        gt=0,
        description=(
            "GPUs one vLLM engine shards the policy over (GPU only): give each generator that many GPUs "
            "(resources.generator_num_gpus); its workers run in their own processes, so weights reach them as LoRA "
            "adapters (ppo.weight_sync=adapter)"
        ),
    )
    max_nonfinite_in_a_row: int = Field(
        3, gt=0, description="stop after this many updates in a row skipped for NaN/inf"
    )
    learner_backend: Literal["torch", "deepspeed"] = Field(
        "torch",
        description=(
            "torch: plain AdamW in the learner actor (CPU default). deepspeed: the learner's optimizer runs in a "
            "DeepSpeed engine (ZeRO stage 1 or 2 from deepspeed.*; on GPUs bf16 as deepspeed.bf16 or "
            "model.precision say); for GPUs"
        ),
    )
    weight_sync: Literal["merged", "adapter"] = Field(
        "merged",
        description=(
            "how the generators get each new policy. merged: the learner folds the LoRA update into the weights it "
            "touches and vLLM reloads them in place (no LoRA kernels while generating). adapter: vLLM serves the LoRA "
            "adapter itself (a new LoRA id per version)"
        ),
    )
    overlap_generation: bool = Field(
        False,
        description=(
            "sample the next batch while the learner updates on this one: one step off-policy. Meant for generators "
            "and a learner on their own devices; on a few shared CPU cores they contend"
        ),
    )

    @property
    def uses_critic(self) -> bool:
        """Only GAE needs a value head."""
        return self.advantage_estimator == "gae"

    @property
    def uses_reward_model(self) -> bool:
        return any(source.kind == "model" for source in self.rewards)

    @model_validator(mode="after")
    def _batch_sizes_fit(self):
        if self.dynamic_sampling and (self.responses_per_prompt < 2 or self.overlap_generation):
            raise ValueError(
                "dynamic_sampling compares the responses to one prompt and samples more before the update: it needs "
                "responses_per_prompt >= 2 and overlap_generation false"
            )
        if sum(source.kind == "model" for source in self.rewards) > 1:
            raise ValueError("rewards: at most one source of kind model (the trained reward model)")
        if self.advantage_estimator in GROUP_ESTIMATORS and self.responses_per_prompt < 2:
            raise ValueError(
                f"advantage_estimator {self.advantage_estimator} compares the responses to one prompt: "
                f"responses_per_prompt must be >= 2, got {self.responses_per_prompt}"
            )
        if self.minibatch_size > self.rollout_batch_size * self.responses_per_prompt:
            raise ValueError("minibatch_size must be <= rollout_batch_size * responses_per_prompt")
        if self.micro_batch_size is not None and self.micro_batch_size > self.minibatch_size:
            raise ValueError("micro_batch_size must be in (0, minibatch_size]")
        return self


CustomResources = dict[str, Float]


class RoleResources(Section):
    """Custom Ray resources per role (name -> amount); CPUs and GPUs have their own settings."""

    generator: CustomResources = Field(default_factory=dict, description="each RolloutGenerator actor")
    learner: CustomResources = Field(default_factory=dict, description="the PolicyLearner actor")
    reference: CustomResources = Field(default_factory=dict, description="the ReferenceModel actor")
    reward: CustomResources = Field(default_factory=dict, description="the RewardModel actor")
    train_worker: CustomResources = Field(default_factory=dict, description="each SFT/RM Ray Train worker")

    @field_validator("generator", "learner", "reference", "reward", "train_worker")
    @classmethod
    def _custom_and_positive(cls, value: dict, info: ValidationInfo) -> dict:
        own = sorted(set(value) & {"CPU", "GPU", "memory", "object_store_memory"})
        if own:
            raise ValueError(
                f"{info.field_name}: {', '.join(own)} have their own settings (actor_num_cpus, cpus_per_worker, "
                "*_num_gpus); role_resources is for custom resources"
            )
        for name, amount in value.items():
            if not amount > 0:
                raise ValueError(f"{info.field_name}: the amount of {name} must be > 0, got {amount}")
        return value


class ResourcesConfig(Section):
    address: str | None = Field(None, description="Ray address; null = RAY_ADDRESS if set, else start a local Ray")
    num_workers: int = Field(2, gt=0, description="Ray Train workers for SFT/RM")
    use_gpu: bool = Field(False, description="one GPU per Ray Train worker; nccl instead of gloo")
    cpus_per_worker: Float = Field(1.0, gt=0, description="CPUs per Ray Train worker")
    generator_replicas: int = Field(1, gt=0, description="RolloutGenerator actors")
    generator_num_gpus: Float = Field(0.0, ge=0, description="GPUs per generator (vLLM)")
    learner_num_gpus: Float = Field(0.0, ge=0, description="GPUs for the policy learner")
    reward_num_gpus: Float = Field(0.0, ge=0, description="GPUs for the reward model")
    reference_num_gpus: Float = Field(0.0, ge=0, description="GPUs for the reference model")
    actor_num_cpus: Float = Field(0.5, ge=0, description="CPUs reserved per PPO actor")
    learner_update_threads: int | None = Field(
        None,
        gt=0,
        description=(
            "torch threads for the PPO update, which runs while the other actors wait: null = every core the learner's "
            "node lets it use; a number when other work shares the node (Ray gives an actor with < 2 CPUs one thread)"
        ),
    )
    generator_threads: int | None = Field(
        None,
        gt=0,
        description=(
            "the same for a CPU RolloutGenerator's vLLM engine (fixed at its start); null = the cores it may use "
            "divided by generator_replicas, since replicas generate at the same time and may share a node"
        ),
    )
    max_actor_restarts: int = Field(
        3, ge=0, description="times PPO re-creates a dead actor of one role before giving up"
    )
    call_timeout_s: Float = Field(
        1800.0, gt=0, description="longest one PPO actor call (generate, score, update, push) may take"
    )
    role_resources: RoleResources = Field(
        default_factory=lambda: RoleResources(),
        description=(
            "custom Ray resources each role's actors or each SFT/RM worker ask for, to place them on the nodes that "
            "offer them: start a node with `ray start --resources='{\"gen_node\": 4}'` and set "
            "`role_resources: {generator: {gen_node: 1}}`"
        ),
    )
    spread_roles: bool = Field(
        False,
        description=(
            "place PPO's actors and the SFT/RM workers on as many nodes as possible (Ray's SPREAD); false = "
            "Ray's default, which packs them onto few nodes"
        ),
    )


class SweepConfig(Section):
    kl_coefs: list[Float] = Field(
        default_factory=lambda: [0.02, 0.1], min_length=1, description="values of ppo.kl_coef to try"
    )
    lrs: list[Float] = Field(default_factory=lambda: [5e-6, 2e-5], min_length=1, description="values of ppo.lr to try")
    search: Literal["grid", "random"] = Field("grid", description="grid, or random draws from the two lists")
    num_samples: int = Field(1, gt=0, description="grid repeats, or random draws")
    scheduler: Literal["asha", "none"] = Field("asha", description="early stopping on `metric`")
    metric: str = Field("reward_mean", description="the training metric ASHA stops trials on (and rank_by: metric)")
    mode: Literal["max", "min"] = Field("max", description="whether `metric` is better high or low")
    max_concurrent_trials: int = Field(1, gt=0, description="trials running at once")
    rank_by: Literal["heldout", "metric"] = Field(
        "heldout", description="pick the best trial by held-out reward gain, or by `metric`"
    )
    kl_budget: Float = Field(
        5.0, gt=0, description="heldout: trials whose held-out KL to the start exceeds this (nats) rank below the rest"
    )
    eval_prompts: int = Field(
        32, gt=0, description="heldout: prompts of the eval split each finished trial is evaluated on"
    )


class EvalConfig(Section):
    """The pipeline's last stage: `eval policy` of the starting and the PPO policy on the test prompts."""

    enabled: bool = Field(True, description="end `rlhf-ray pipeline` with the eval stage")
    prompts_limit: int | None = Field(64, gt=0, description="the first N prompts of the test split (null = all)")
    samples_per_prompt: int = Field(1, gt=0, description="responses per prompt and policy")
    extra_reward_models: list[str] = Field(
        default_factory=list, description="judges besides the run's RM (e.g. one trained on the other data half)"
    )


class RunConfig(Section):
    name: str = Field("rlhf-run", description="run folder name under output_dir; rerun with the same name to resume")
    output_dir: str = Field(
        "runs",
        description="every stage's outputs: a local folder, a folder every node mounts, or an object-store URI "
        "(s3://bucket/prefix, gs://bucket/prefix; see docs/cluster.md)",
    )
    local_copy_dir: str = Field(
        "/tmp/rlhf-ray-runs",
        description="with a URI run.output_dir: where each node keeps its working copy of the run folder",
    )
    seed: int = Field(0, description="seed of model initialisation, sampling and data order")

    @field_validator("name")
    @classmethod
    def _folder_name(cls, name: str) -> str:
        if not name or "/" in name:
            raise ValueError(f"name must be a non-empty folder name, got {name!r}")
        return name

    @field_validator("output_dir")
    @classmethod
    def _folder_or_uri(cls, output_dir: str) -> str:
        if is_uri(output_dir) and not urlsplit(output_dir).scheme.isidentifier():
            raise ValueError(f"{output_dir!r} is neither a folder nor a URI such as s3://bucket/prefix")
        return output_dir

    @property
    def path(self) -> Path:
        """The run folder; with a URI output_dir, this node's working copy of it."""
        if is_uri(self.output_dir):
            return local_copy_path(self.output_dir, self.name, self.local_copy_dir)
        return Path(self.output_dir) / self.name

    @property
    def store(self) -> RunStore | None:
        """The object store holding the run, when output_dir is a URI."""
        if not is_uri(self.output_dir):
            return None
        return RunStore(self.output_dir, self.name, str(self.path))


class Config(Section):
    run: RunConfig = Field(default_factory=RunConfig, description="run name, output folder, seed")
    model: ModelConfig = Field(default_factory=ModelConfig, description="the base model and numerics")
    lora: LoraConfig = Field(
        default_factory=LoraConfig, description="LoRA adapter (SFT/RM optional; the PPO policy always)"
    )
    deepspeed: DeepSpeedConfig = Field(
        default_factory=DeepSpeedConfig, description="the SFT/RM jobs' DeepSpeed settings"
    )
    data: DataConfig = Field(default_factory=DataConfig, description="datasets, lengths and held-out splits")
    sft: SFTConfig = Field(default_factory=SFTConfig, description="the SFT Ray Train job")
    rm: RMConfig = Field(default_factory=RMConfig, description="the reward-model Ray Train job")
    ppo: PPOConfig = Field(default_factory=PPOConfig, description="PPO over the four actors")
    resources: ResourcesConfig = Field(
        default_factory=ResourcesConfig, description="Ray, workers, actors, devices, timeouts"
    )
    sweep: SweepConfig = Field(default_factory=SweepConfig, description="Ray Tune sweep over ppo.kl_coef and ppo.lr")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="the pipeline's eval stage")

    @model_validator(mode="after")
    def _merged_sync_stays_inside_the_layers(self):
        outside = sorted(set(self.lora.target_modules) & {"lm_head", "embed_tokens", "wte", "embed_out"})
        if self.ppo.weight_sync == "merged" and outside:
            raise ValueError(
                f"ppo.weight_sync=merged folds LoRA into decoder-layer weights, but lora.target_modules has {outside} "
                "(tied to the embeddings in many models); use ppo.weight_sync=adapter"
            )
        return self

    @model_validator(mode="after")
    def _tensor_parallel_generators_hold_their_gpus(self):
        size, gpus = self.ppo.vllm_tensor_parallel_size, self.resources.generator_num_gpus
        if size > 1 and gpus < size:
            raise ValueError(
                f"ppo.vllm_tensor_parallel_size {size} shards each generator over {size} GPUs, but "
                f"resources.generator_num_gpus is {gpus:g}; set it to {size}"
            )
        if size > 1 and self.ppo.weight_sync != "adapter":
            raise ValueError(
                "ppo.vllm_tensor_parallel_size > 1 runs vLLM's workers in their own processes, which take new weights "
                "as LoRA adapters only; set ppo.weight_sync=adapter"
            )
        return self


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    return typed_yaml.load(Config, path, overrides)


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config from `to_dict` output (e.g. inside a Ray worker)."""
    return typed_yaml.validate(Config, data, typed_yaml.Origin("<dict>"))


def save_config(config: Config, folder: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved config next to a run's outputs."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    target.write_text(typed_yaml.dump(config))
    return target


def require_writable(folder: str | Path) -> None:
    """PermissionError naming `folder` unless it, or the nearest folder above it that exists, can be written:
    checked before a run starts, so a read-only output folder fails in one line and nothing is created."""
    folder = Path(folder).absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise NotADirectoryError(f"output folder {folder}: {existing} is a file, not a folder (run.output_dir)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(
            f"output folder {folder}: {existing} cannot be written (read-only or no permission); "
            "choose another run.output_dir"
        )


__all__ = ["Config", "ConfigError", "load_config", "config_from_dict", "save_config"]
