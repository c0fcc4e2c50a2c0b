"""One PPO iteration over the Ray actors, written as the algorithm's numbered phases."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

from rlhf_ray.algo.losses import masked_mean
from rlhf_ray.algo.ppo import gae_advantages, token_rewards, whiten
from rlhf_ray.config import PPOConfig
from rlhf_ray.ppo.experience import Experience
from rlhf_ray.ppo.sequences import pack


@dataclass
class PPOActors:
    generators: list  # RolloutGenerator handles (replicas share each batch)
    learner: object  # PolicyLearner handle
    reward: object  # RewardModel handle
    reference: object  # ReferenceModel handle


class PhaseTimer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        yield
        self.seconds[f"seconds_{phase}"] = time.perf_counter() - start


def split_evenly(items: list, parts: int) -> list[list]:
    size, extra = divmod(len(items), parts)
    chunks, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        chunks.append(items[start:end])
        start = end
    return chunks


def ppo_step(actors: PPOActors, prompts: list[list[int]], sampling, kl_coef: float, ppo: PPOConfig,
             pad_id: int) -> tuple[Experience, dict, list]:
    """Collect one batch of experience, update the policy, push the new adapter to the generators."""
    import ray

    timer = PhaseTimer()
    # 1. generate: the prompt batch is split across generator replicas
    with timer("generate"):
        shards = split_evenly(list(range(len(prompts))), len(actors.generators))
        refs = [g.generate.remote([prompts[i] for i in shard], sampling) for g, shard in zip(actors.generators, shards) if shard]
        rollouts = []
        for shard, shard_rollouts in zip([s for s in shards if s], ray.get(refs)):
            for r in shard_rollouts:
                r.prompt_index = shard[r.prompt_index]
                rollouts.append(r)
    prompt_ids = [prompts[r.prompt_index] for r in rollouts]
    responses = [r.token_ids for r in rollouts]
    batch = pack(prompt_ids, responses, pad_id)
    mask = batch.response_mask

    # 2. score, 3. reference log-probs, and the learner's old log-probs/values, all at once
    with timer("score_reference_values"):
        batch_ref = ray.put(batch)
        score_ref = actors.reward.score.remote(prompt_ids, responses)
        reference_ref = actors.reference.logprobs.remote(batch_ref)
        learner_ref = actors.learner.logprobs_and_values.remote(batch_ref)
        scores, ref_logprobs, (old_logprobs, values) = ray.get([score_ref, reference_ref, learner_ref])

    # 4. advantages: KL-shaped per-token rewards, then GAE
    with timer("advantages"):
        rewards, kl = token_rewards(scores, old_logprobs, ref_logprobs, mask, kl_coef, ppo.kl_estimator)
        advantages, returns = gae_advantages(rewards, values, mask, ppo.gamma, ppo.lam)
        if ppo.whiten_advantages:
            advantages = whiten(advantages, mask)
    experience = Experience(batch, old_logprobs, ref_logprobs, values, scores, rewards, advantages, returns)

    # 5. update
    with timer("update"):
        stats = ray.get(actors.learner.train_step.remote(experience))

    # 6. push weights
    with timer("push_weights"):
        adapter_ref = actors.learner.export_adapter.remote()
        versions = ray.get([g.load_adapter.remote(stats["policy_version"], adapter_ref) for g in actors.generators])

    lengths = mask.sum(1).float()
    generated_tokens = float(lengths.sum())
    metrics = {
        "reward_mean": float(scores.mean()), "reward_std": float(scores.std()) if len(scores) > 1 else 0.0,
        "kl": float(kl.sum(1).mean()), "kl_coef": kl_coef,
        "response_length": float(lengths.mean()), "finished_fraction": sum(r.finished for r in rollouts) / len(rollouts),
        "generated_tokens_per_s": generated_tokens / max(timer.seconds["seconds_generate"], 1e-9),
        "advantage_mean": float(masked_mean(advantages, mask)), "return_mean": float(masked_mean(returns, mask)),
        "generator_versions_min": min(versions), "generator_versions_max": max(versions),
        **{k: v for k, v in stats.items()}, **timer.seconds,
    }
    metrics["seconds_iteration"] = sum(timer.seconds.values())
    return experience, metrics, rollouts
