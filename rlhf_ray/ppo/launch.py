"""The PPO roles as named Ray actors with resources from the config: generators, learner, reference, and one
actor per reward source."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from actors.policy_learner import PolicyLearner
from actors.reference_model import ReferenceModel
from actors.reward_model import RewardModel
from actors.reward_sources import FunctionReward, HttpReward
from actors.rollout_generator import RolloutGenerator
from rlhf_ray.config import Config
from rlhf_ray.models.optim import learner_deepspeed_config
from rlhf_ray.placement import Request
from rlhf_ray.ppo.crew import ActorCrew, RoleSpec, wait_until_names_free
from rlhf_ray.roles import GENERATOR_PREFIX, LEARNER, REFERENCE, REWARD, reward_role
from rlhf_ray.tokenization import response_ids


@dataclass
class ModelPaths:
    policy: Path  # starting policy (SFT model): generator base, learner base, reference
    reward: Path | None  # reward model folder (with reward_stats.json); None when no reward source is the RM


def end_of_turn_suffix(tokenizer) -> list[int]:
    """Tokens the chat template puts after EOS at the end of an assistant turn (often a newline)."""
    ids = response_ids(tokenizer, [{"role": "user", "content": "hi"}], "ok")
    eos = tokenizer.eos_token_id
    return ids[len(ids) - ids[::-1].index(eos) :] if eos in ids else []


def reward_specs(config: Config, paths: ModelPaths, tokenizer, options: dict) -> list[RoleSpec]:
    """One actor per `ppo.rewards` source."""
    ppo, model = config.ppo, config.model
    specs = []
    for index, source in enumerate(ppo.rewards):
        name = reward_role(source.kind, index)
        if source.kind == "model":
            kwargs = dict(
                dtype=model.dtype,
                normalize=ppo.normalize_reward,
                clip=ppo.reward_clip,
                eos_token_id=tokenizer.eos_token_id,
                end_of_turn_suffix=end_of_turn_suffix(tokenizer),
                trust_remote_code=model.trust_remote_code,
                precision=model.precision,
            )
            specs.append(RoleSpec(name, RewardModel, (str(paths.reward),), kwargs, dict(options)))
        elif source.kind == "function":
            kwargs = dict(batched=source.batched, trust_remote_code=model.trust_remote_code)
            spec = RoleSpec(name, FunctionReward, (function_name(source.function), str(paths.policy)), kwargs)
            specs.append(spec)
        else:
            kwargs = dict(
                timeout_s=source.timeout_s,
                max_retries=source.max_retries,
                backoff_s=source.backoff_s,
                trust_remote_code=model.trust_remote_code,
            )
            specs.append(RoleSpec(name, HttpReward, (source.url, str(paths.policy)), kwargs))
    for spec in specs:
        if spec.cls is not RewardModel:  # light actors: no model, no GPU
            spec.options = {"namespace": options["namespace"], "num_cpus": 0}
    return specs


def function_name(name: str) -> str:
    """`file.py:function` with the file made absolute (the actor may start in another directory)."""
    module, _, function = name.rpartition(":")
    return f"{Path(module).resolve()}:{function}" if module.endswith(".py") else name


ROLE_GPUS = {  # the setting of each placed role's GPUs
    "generator": "generator_num_gpus",
    "learner": "learner_num_gpus",
    "reference": "reference_num_gpus",
    "reward": "reward_num_gpus",
}


def role_options(config: Config, role: str) -> dict:
    """Ray options of a `role` actor ("generator", "learner", "reference", "reward"): its namespace, CPUs, GPUs,
    custom resources (`resources.role_resources`) and, with `resources.spread_roles`, the SPREAD strategy."""
    res = config.resources
    options = {
        "namespace": f"rlhf-ray-{config.run.name}",
        "num_cpus": res.actor_num_cpus,
        "num_gpus": getattr(res, ROLE_GPUS[role]),
    }
    custom = getattr(res.role_resources, role)
    if custom:
        options["resources"] = dict(custom)
    if res.spread_roles:
        options["scheduling_strategy"] = "SPREAD"
    return options


def actor_specs(config: Config, paths: ModelPaths, tokenizer, max_model_len: int) -> list[RoleSpec]:
    """The PPO roles, each a named actor with the resources the config gives it."""
    res, ppo, model = config.resources, config.ppo, config.model

    generators = [
        RoleSpec(
            f"{GENERATOR_PREFIX}{i}",
            RolloutGenerator,
            (str(paths.policy),),
            dict(
                max_lora_rank=config.lora.r,
                max_model_len=max_model_len,
                dtype=model.dtype,
                enforce_eager=ppo.vllm_enforce_eager,
                kv_cache_gib=ppo.vllm_kv_cache_gib,
                gpu_memory_utilization=ppo.vllm_gpu_memory_utilization,
                tensor_parallel_size=ppo.vllm_tensor_parallel_size,
                seed=config.run.seed + i,
                trust_remote_code=model.trust_remote_code,
                enable_lora=ppo.weight_sync == "adapter",
                threads=res.generator_threads,
                threads_shared_by=res.generator_replicas,
                precision=model.precision,
            ),
            role_options(config, "generator"),
        )
        for i in range(res.generator_replicas)
    ]
    learner_ds = learner_deepspeed_config(config) if ppo.learner_backend == "deepspeed" else None
    learner = RoleSpec(
        LEARNER,
        PolicyLearner,
        (str(paths.policy), config.lora, ppo),
        dict(
            dtype=model.dtype,
            precision=model.precision,
            seed=config.run.seed,
            trust_remote_code=model.trust_remote_code,
            deepspeed_config=learner_ds,
            update_threads=res.learner_update_threads,
        ),
        role_options(config, "learner"),
    )
    reference = RoleSpec(
        REFERENCE,
        ReferenceModel,
        (str(paths.policy), model.dtype, ppo.temperature, model.trust_remote_code),
        dict(precision=model.precision),
        role_options(config, "reference"),
    )
    rewards = reward_specs(config, paths, tokenizer, role_options(config, "reward"))
    specs = [*generators, learner, *rewards, reference]
    for spec in specs:
        spec.options["name"] = spec.name
    return specs


def role_requests(config: Config) -> list[Request]:
    """What each PPO actor that takes resources holds while it lives (function and HTTP reward actors take
    none): for the start-up check that the cluster can hold them all, and for a sweep trial's bundles."""
    return list(requests_by_actor(config).values())


def requests_by_actor(config: Config) -> dict[str, Request]:
    """`role_requests` by actor name (the crew checks a lost actor's request before re-creating it)."""
    roles = [(f"{GENERATOR_PREFIX}{i}", "generator") for i in range(config.resources.generator_replicas)]
    roles += [(LEARNER, "learner"), (REFERENCE, "reference")]
    roles += [(REWARD, "reward")] if config.ppo.uses_reward_model else []
    return {name: role_request(config, role, f"the {name} actor") for name, role in roles}


def role_request(config: Config, role: str, who: str) -> Request:
    """What one actor of `role` asks of a node, and the settings that ask it."""
    options = role_options(config, role)
    needs = {"CPU": options["num_cpus"], "GPU": options["num_gpus"], **options.get("resources", {})}
    settings = f"resources.actor_num_cpus, resources.{ROLE_GPUS[role]}"
    settings += f", resources.role_resources.{role}" if options.get("resources") else ""
    return Request(who, needs, settings)


def launch_actors(config: Config, specs: list[RoleSpec]) -> ActorCrew:
    """Start the actors (after any left by a dead driver are gone) and wait until all are ready."""
    # A driver that died leaves its actors for Ray to reap; a resumed run waits for their names.
    wait_until_names_free(
        [spec.name for spec in specs],
        specs[0].options["namespace"],
        "another driver is running this run.name (stop it or choose another run.name)",
    )
    return ActorCrew(
        specs,
        max_restarts=config.resources.max_actor_restarts,
        timeout_s=config.resources.call_timeout_s,
        requests=requests_by_actor(config),
    )
