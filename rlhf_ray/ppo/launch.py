"""Start the four PPO roles as named Ray actors with resources from the config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rlhf_ray.config import Config
from rlhf_ray.ppo.driver import PPOActors


@dataclass
class ModelPaths:
    policy: Path  # starting policy (SFT model): generator base, learner base, reference
    reward: Path  # reward model folder (with reward_stats.json)


def end_of_turn_suffix(tokenizer) -> list[int]:
    """Tokens the chat template puts after EOS at the end of an assistant turn (often a newline)."""
    from rlhf_ray.tokenization import response_ids

    ids = response_ids(tokenizer, [{"role": "user", "content": "hi"}], "ok")
    eos = tokenizer.eos_token_id
    return ids[len(ids) - ids[::-1].index(eos):] if eos in ids else []


def wait_until_names_free(names: list[str], namespace: str, timeout_s: float = 60.0) -> None:
    """A driver that died leaves its actors for Ray to reap; a resumed run waits for their names."""
    import time

    import ray

    deadline = time.monotonic() + timeout_s
    for name in names:
        while True:
            try:
                ray.get_actor(name, namespace=namespace)
            except ValueError:
                break  # no such actor
            if time.monotonic() > deadline:
                raise RuntimeError(f"actor '{name}' of namespace '{namespace}' is still alive: another driver is "
                                   "running this run.name; stop it or choose another run.name")
            time.sleep(0.5)


def launch_actors(config: Config, paths: ModelPaths, tokenizer, max_model_len: int) -> PPOActors:
    import ray

    from actors.policy_learner import PolicyLearner
    from actors.reference_model import ReferenceModel
    from actors.reward_model import RewardModel
    from actors.rollout_generator import RolloutGenerator

    res, ppo, model = config.resources, config.ppo, config.model
    namespace = f"rlhf-ray-{config.run.name}"

    def options(name: str, gpus: float) -> dict:
        return {"name": name, "namespace": namespace, "num_cpus": res.actor_num_cpus, "num_gpus": gpus}

    names = [f"rollout-generator-{i}" for i in range(res.generator_replicas)]
    wait_until_names_free(names + ["policy-learner", "reward-model", "reference-model"], namespace)

    generators = [
        ray.remote(RolloutGenerator).options(**options(names[i], res.generator_num_gpus)).remote(
            str(paths.policy), max_lora_rank=config.lora.r, max_model_len=max_model_len, dtype=model.dtype,
            enforce_eager=ppo.vllm_enforce_eager, kv_cache_gib=ppo.vllm_kv_cache_gib,
            gpu_memory_utilization=ppo.vllm_gpu_memory_utilization, seed=config.run.seed + i,
            trust_remote_code=model.trust_remote_code)
        for i in range(res.generator_replicas)]
    learner = ray.remote(PolicyLearner).options(**options("policy-learner", res.learner_num_gpus)).remote(
        str(paths.policy), config.lora, ppo, dtype=model.dtype, seed=config.run.seed, trust_remote_code=model.trust_remote_code)
    reward = ray.remote(RewardModel).options(**options("reward-model", res.reward_num_gpus)).remote(
        str(paths.reward), dtype=model.dtype, normalize=ppo.normalize_reward, clip=ppo.reward_clip,
        eos_token_id=tokenizer.eos_token_id, end_of_turn_suffix=end_of_turn_suffix(tokenizer),
        trust_remote_code=model.trust_remote_code)
    reference = ray.remote(ReferenceModel).options(**options("reference-model", res.reference_num_gpus)).remote(
        str(paths.policy), model.dtype, ppo.temperature, model.trust_remote_code)
    return PPOActors(generators, learner, reward, reference)


def stop_actors(actors: PPOActors) -> None:
    import ray

    for handle in [*actors.generators, actors.learner, actors.reward, actors.reference]:
        ray.kill(handle)
