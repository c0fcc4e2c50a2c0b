"""One PPO iteration over the Ray actors, written as the algorithm's numbered phases."""

from __future__ import annotations

import math
import time
from contextlib import contextmanager

from rlhf_ray.algo.losses import masked_mean
from rlhf_ray.algo.ppo import gae_advantages, nonfinite_names, token_rewards, whiten
from rlhf_ray.config import PPOConfig
from rlhf_ray.ppo.crew import ActorCrew, Call
from rlhf_ray.roles import (
    GENERATOR_PREFIX,
    LEARNER,
    REFERENCE,
    REWARD,
    GeneratorRole,
    LearnerRole,
    ReferenceRole,
    RewardRole,
    remote_call,
)
from rlhf_ray.wire import Experience, pack

# ppo.weight_sync -> (the learner's export method, the generators' load method)
WEIGHT_SYNC_METHODS = {"merged": (LearnerRole.export_merged_weights, GeneratorRole.load_merged_weights),
                       "adapter": (LearnerRole.export_adapter, GeneratorRole.load_adapter)}


class GeneratorWeights:
    """The policy every generator must serve; a re-created generator gets it again before it works."""

    def __init__(self, crew: ActorCrew, weight_sync: str):
        self.crew = crew
        self.export_method, self.load_method = WEIGHT_SYNC_METHODS[weight_sync]
        self.payload = None  # the newest AdapterPayload or MergedWeights
        crew.on_restart = self._restore

    @property
    def version(self) -> int:
        return self.payload.version if self.payload is not None else 0

    def push_from_learner(self) -> list[int]:
        """Export the learner's policy and load it into every generator; returns their versions."""
        import ray

        self.payload = self.crew.call("export_weights", LEARNER, self.export_method)
        ref = ray.put(self.payload)
        return self.crew.run("push_weights", [Call.to(name, self.load_method, self.payload.version, ref)
                                              for name in self.crew.generator_names])

    def _restore(self, role: str, handle) -> None:
        import ray

        if role.startswith(GENERATOR_PREFIX) and self.payload is not None:
            ray.get(remote_call(handle, self.load_method, self.payload.version, self.payload),
                    timeout=self.crew.timeout_s)


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


def generator_logprob_gap(rollouts: list, learner_logprobs) -> float:
    """Mean |vLLM's log-prob - the learner's| over the sampled tokens.

    Small when the generators serve the learner's current policy at temperature 1 (vLLM reports
    log-probs before temperature scaling, the learner after): about 1e-5 in fp32 and 0.03-0.04 in
    bf16-mixed (bf16 kernels of two libraries round differently). A large gap means stale weights.
    """
    gaps = [abs(mine - theirs) for i, r in enumerate(rollouts)
            for mine, theirs in zip(learner_logprobs[i].tolist(), r.logprobs)]
    return sum(gaps) / len(gaps) if gaps else 0.0


def generate_calls(crew: ActorCrew, prompts: list[list[int]], sampling) -> tuple[list[list[int]], list[Call]]:
    """The prompt batch split across the generator replicas: (prompt indices per shard, one call per shard)."""
    shards = [s for s in split_evenly(list(range(len(prompts))), len(crew.generator_names)) if s]
    calls = [Call.to(name, GeneratorRole.generate, [prompts[i] for i in shard], sampling, shard[0])
             for name, shard in zip(crew.generator_names, shards)]
    return shards, calls


def gather_rollouts(shards: list[list[int]], results: list[list]) -> list:
    """The shards' rollouts in one list, each pointing at its prompt in the whole batch."""
    rollouts = []
    for shard, shard_rollouts in zip(shards, results):
        for r in shard_rollouts:
            r.prompt_index = shard[r.prompt_index]
            rollouts.append(r)
    return rollouts


def ppo_step(crew: ActorCrew, weights: GeneratorWeights, prompts: list[list[int]], sampling, kl_coef: float,
             ppo: PPOConfig, pad_id: int, *, rollouts: list | None = None,
             next_batch: tuple | None = None) -> tuple[Experience, dict, list, list | None]:
    """Collect one batch of experience, update the policy, push the new weights to the generators.

    With overlapped generation, `rollouts` for `prompts` were already sampled (during the previous
    update, by the policy before it), and `next_batch` = (prompts, sampling) of the next iteration is
    sampled while the learner updates; its rollouts are returned last (None without `next_batch`).

    If any reward, log-prob, value or advantage is NaN/inf, the update and the push are skipped
    (weights unchanged) and `metrics["update_skipped"]` is 1.
    """
    import ray

    timer = PhaseTimer()
    # 1. generate: the prompt batch is split across generator replicas
    if rollouts is None:
        with timer("generate"):
            shards, calls = generate_calls(crew, prompts, sampling)
            rollouts = gather_rollouts(shards, crew.run("generate", calls))
    prompt_ids = [prompts[r.prompt_index] for r in rollouts]
    responses = [r.token_ids for r in rollouts]
    batch = pack(prompt_ids, responses, pad_id)
    mask = batch.response_mask

    # 2. score, 3. reference log-probs, and the learner's old log-probs/values, all at once
    with timer("score_reference_values"):
        batch_ref = ray.put(batch)
        scores, ref_logprobs, (old_logprobs, values) = crew.run("score_reference_values", [
            Call.to(REWARD, RewardRole.score, prompt_ids, responses),
            Call.to(REFERENCE, ReferenceRole.logprobs, batch_ref),
            Call.to(LEARNER, LearnerRole.logprobs_and_values, batch_ref)])

    # 4. advantages: KL-shaped per-token rewards, then GAE
    with timer("advantages"):
        rewards, kl = token_rewards(scores, old_logprobs, ref_logprobs, mask, kl_coef, ppo.kl_estimator)
        advantages, returns = gae_advantages(rewards, values, mask, ppo.gamma, ppo.lam)
        if ppo.whiten_advantages:
            advantages = whiten(advantages, mask)
    experience = Experience(batch, old_logprobs, ref_logprobs, values, scores, rewards, advantages, returns)
    nonfinite = nonfinite_names({"scores": scores, "old_logprobs": old_logprobs, "ref_logprobs": ref_logprobs,
                                 "values": values, "advantages": advantages, "returns": returns}, mask)

    stats: dict = {"update_skipped": 1.0, "nonfinite_in": nonfinite} if nonfinite else {}
    versions = [weights.version]
    next_shards, next_calls = generate_calls(crew, *next_batch) if next_batch is not None else ([], [])
    next_results: list = []
    if not nonfinite:
        # 5. update (the learner itself skips any optimizer step whose loss or gradients are not finite),
        # with the next batch sampled meanwhile by the current weights when generation overlaps
        with timer("update" if next_batch is None else "update_and_generate_next"):
            stats, *next_results = crew.run("update", [Call.to(LEARNER, LearnerRole.train_step, experience), *next_calls])
        # 6. push weights
        if not stats.get("update_skipped"):
            with timer("push_weights"):
                versions = weights.push_from_learner()
    elif next_calls:
        with timer("generate_next"):
            next_results = crew.run("generate", next_calls)
    next_rollouts = gather_rollouts(next_shards, next_results) if next_batch is not None else None

    lengths = mask.sum(1).float()
    generated_tokens = float(lengths.sum())
    metrics = {
        "reward_mean": float(scores.mean()), "reward_std": float(scores.std()) if len(scores) > 1 else 0.0,
        "kl": float(kl.sum(1).mean()), "kl_coef": kl_coef,
        "response_length": float(lengths.mean()), "finished_fraction": sum(r.finished for r in rollouts) / len(rollouts),
        "advantage_mean": float(masked_mean(advantages, mask)), "return_mean": float(masked_mean(returns, mask)),
        "generator_logprob_gap": generator_logprob_gap(rollouts, old_logprobs),
        "generator_versions_min": min(versions), "generator_versions_max": max(versions),
        **stats, **timer.seconds,
    }
    if "seconds_generate" in timer.seconds:  # (an overlapped generation has no time of its own)
        metrics["generated_tokens_per_s"] = generated_tokens / max(timer.seconds["seconds_generate"], 1e-9)
    metrics["seconds_iteration"] = sum(timer.seconds.values())
    return experience, metrics, rollouts, next_rollouts


def finite_only(metrics: dict) -> dict:
    """Numbers that can go into JSON lines, TensorBoard and Tune (non-finite ones are dropped)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
