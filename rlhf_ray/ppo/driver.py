"""One PPO iteration over the Ray actors, written as the algorithm's numbered phases."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from rlhf_ray.algo.advantages import critic_free_advantages, zero_advantage_groups
from rlhf_ray.algo.losses import masked_mean
from rlhf_ray.algo.ppo import gae_advantages, nonfinite_names, token_rewards, whiten
from rlhf_ray.config import PPOConfig
from rlhf_ray.ppo.crew import ActorCrew, Call
from rlhf_ray.ppo.dynamic_sampling import Sampled, informative_groups
from rlhf_ray.ppo.rollouts import PhaseTimer, PromptBatch, RolloutSource
from rlhf_ray.roles import (
    GENERATOR_PREFIX,
    LEARNER,
    REFERENCE,
    GeneratorRole,
    LearnerRole,
    ReferenceRole,
    RewardRole,
    remote_call,
    reward_role,
)
from rlhf_ray.wire import Experience, PackedBatch, Rollout, UpdateStats, pack

# ppo.weight_sync -> (the learner's export method, the generators' load method)
WEIGHT_SYNC_METHODS = {
    "merged": (LearnerRole.export_merged_weights, GeneratorRole.load_merged_weights),
    "adapter": (LearnerRole.export_adapter, GeneratorRole.load_adapter),
}


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
        return self.crew.run(
            "push_weights",
            [Call.to(name, self.load_method, self.payload.version, ref) for name in self.crew.generator_names],
        )

    def _restore(self, role: str, handle) -> None:
        import ray

        if role.startswith(GENERATOR_PREFIX) and self.payload is not None:
            ray.get(
                remote_call(handle, self.load_method, self.payload.version, self.payload), timeout=self.crew.timeout_s
            )


def generator_logprob_gap(rollouts: list, learner_logprobs) -> float:
    """Mean |vLLM's log-prob - the learner's| over the sampled tokens.

    Small when the generators serve the learner's current policy at temperature 1 (vLLM reports
    log-probs before temperature scaling, the learner after): about 1e-5 in fp32 and 0.03-0.04 in
    bf16-mixed (bf16 kernels of two libraries round differently). A large gap means stale weights.
    """
    gaps = [
        abs(mine - theirs)
        for i, r in enumerate(rollouts)
        for mine, theirs in zip(learner_logprobs[i].tolist(), r.logprobs)
    ]
    return sum(gaps) / len(gaps) if gaps else 0.0


@dataclass
class StepResult:
    """One iteration's experience and what happened to it."""

    experience: Experience
    rollouts: list[Rollout]
    update: UpdateStats | None  # None when the update did not run
    nonfinite_in: list[str]  # names of the experience tensors holding NaN/inf (then no update ran)
    kl: torch.Tensor  # (B, A) per-token KL to the reference
    kl_coef: float
    generator_versions: list[int]
    seconds: dict[str, float]  # seconds_<phase>
    group_size: int = 1  # responses per prompt
    source_scores: dict[str, torch.Tensor] = field(default_factory=dict)  # (B,) per reward source, by actor name
    sampled: Sampled | None = None  # what dynamic sampling did (ppo.dynamic_sampling)

    @property
    def update_skipped(self) -> bool:
        return self.update is None or bool(self.update["update_skipped"])

    @property
    def mean_kl(self) -> float:
        return float(self.kl.sum(1).mean())

    def metrics(self) -> dict:
        exp, mask = self.experience, self.experience.batch.response_mask
        lengths = mask.sum(1).float()
        metrics = {
            "reward_mean": float(exp.scores.mean()),
            "reward_std": float(exp.scores.std()) if len(exp.scores) > 1 else 0.0,
            "kl": self.mean_kl,
            "kl_coef": self.kl_coef,
            "response_length": float(lengths.mean()),
            "finished_fraction": sum(r.finished for r in self.rollouts) / len(self.rollouts),
            "advantage_mean": float(masked_mean(exp.advantages, mask)),
            "generator_logprob_gap": generator_logprob_gap(self.rollouts, exp.old_logprobs),
            "generator_versions_min": min(self.generator_versions),
            "generator_versions_max": max(self.generator_versions),
            **(self.update or {}),
            "update_skipped": float(self.update_skipped),
            **self.seconds,
        }
        if exp.returns is not None:
            metrics["return_mean"] = float(masked_mean(exp.returns, mask))
        if len(self.source_scores) > 1:  # the weighted sum is reward_mean; each source's own mean beside it
            for role, scores in self.source_scores.items():
                metrics[f"reward_mean_{role.removeprefix('reward-').replace('-', '_')}"] = float(scores.mean())
        if self.sampled is not None:
            metrics.update(self.sampled.metrics)
        if self.group_size > 1:  # prompts whose responses all scored the same: no advantage for a group estimator
            metrics["zero_advantage_groups"] = zero_advantage_groups(exp.scores, self.group_size)
        if "seconds_generate" in self.seconds:  # (an overlapped generation has no time of its own)
            generated = self.sampled.metrics["sampled_tokens"] if self.sampled is not None else float(lengths.sum())
            metrics["generated_tokens_per_s"] = generated / max(self.seconds["seconds_generate"], 1e-9)
        metrics["seconds_iteration"] = sum(self.seconds.values())
        return metrics


# The parts of the experience that hold no NaN/inf before an update may run (on real tokens only).
CHECKED_FOR_NONFINITE = ("scores", "old_logprobs", "ref_logprobs", "values", "advantages", "returns")


def advantages_of(
    scores: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    values: torch.Tensor | None,
    mask: torch.Tensor,
    kl_coef: float,
    ppo: PPOConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-token rewards (KL-shaped when `ppo.kl_in` is `reward`), then `ppo.advantage_estimator`'s advantages.

    Returns (rewards, kl, advantages, returns), all (B, A); returns is None for a critic-free estimator.
    """
    reward_kl_coef = kl_coef if ppo.kl_in == "reward" else 0.0
    rewards, kl = token_rewards(scores, old_logprobs, ref_logprobs, mask, reward_kl_coef, ppo.kl_estimator)
    if not ppo.uses_critic:
        group = ppo.responses_per_prompt
        return rewards, kl, critic_free_advantages(ppo.advantage_estimator, rewards, mask, group, ppo.gamma), None
    advantages, returns = gae_advantages(rewards, values, mask, ppo.gamma, ppo.lam)
    if ppo.whiten_advantages:
        advantages = whiten(advantages, mask)
    return rewards, kl, advantages, returns


def check_grouped(rollouts: list[Rollout], group_size: int) -> int:
    """The group estimators read rows [g*k, (g+1)*k) as prompt g's k responses; a RuntimeError if they are not.
    Returns `group_size`."""
    found = [r.prompt_index for r in rollouts]
    expected = [row // group_size for row in range(len(rollouts))]
    if found != expected:
        raise RuntimeError(f"rollouts are not grouped by prompt in groups of {group_size}: prompt indices {found}")
    return group_size


def reward_sources(ppo: PPOConfig) -> list[tuple[str, float]]:
    """(actor name, weight) of each `ppo.rewards` source."""
    return [(reward_role(source.kind, i), source.weight) for i, source in enumerate(ppo.rewards)]


def score_calls(batch: PromptBatch, rollouts: list[Rollout], roles: list[str]) -> list[Call]:
    """One `score` call per reward source over the rollouts (with each one's prompt tokens and row)."""
    prompts = [batch.prompts[r.prompt_index] for r in rollouts]
    rows = [batch.rows[r.prompt_index] for r in rollouts] if batch.rows is not None else None
    return [Call.to(role, RewardRole.score, prompts, [r.token_ids for r in rollouts], rows) for role in roles]


def score_reference_values(
    crew: ActorCrew, packed: PackedBatch, scoring: list[Call]
) -> tuple[list[torch.Tensor], torch.Tensor, tuple[torch.Tensor, torch.Tensor | None]]:
    """The `scoring` calls' (B,) scores, the reference's log-probs and the learner's (log-probs, values),
    computed concurrently."""
    import ray

    packed_ref = ray.put(packed)  # (Ray resolves an object ref passed as a top-level argument)
    *scores, ref_logprobs, logprobs_and_values = crew.run(
        "score_reference_values",
        [
            *scoring,
            Call.to(REFERENCE, ReferenceRole.logprobs, packed_ref),
            Call.to(LEARNER, LearnerRole.logprobs_and_values, packed_ref),
        ],
    )
    return scores, ref_logprobs, logprobs_and_values


def sample_informative(
    crew: ActorCrew,
    source: RolloutSource,
    first: tuple[PromptBatch, list[Rollout]],
    more_prompts: Callable[[int], PromptBatch] | None,
    ppo: PPOConfig,
    timer: PhaseTimer,
) -> Sampled:
    """Dynamic sampling (`ppo.dynamic_sampling`): score rounds of rollouts, keep the informative groups."""
    weights = dict(reward_sources(ppo))

    def score(batch: PromptBatch, rollouts: list[Rollout]) -> dict[str, torch.Tensor]:
        with timer("score"):
            return dict(zip(weights, crew.run("score", score_calls(batch, rollouts, list(weights)))))

    def sample_round(round_index: int) -> tuple[PromptBatch, list[Rollout]]:
        batch = more_prompts(round_index)
        return batch, source.collect(batch, timer)

    max_rounds = ppo.max_sampling_rounds if more_prompts is not None else 1
    return informative_groups(first, sample_round, score, weights, max_rounds)


def ppo_step(
    crew: ActorCrew,
    weights: GeneratorWeights,
    source: RolloutSource,
    batch: PromptBatch,
    kl_coef: float,
    ppo: PPOConfig,
    pad_id: int,
    more_prompts: Callable[[int], PromptBatch] | None = None,
) -> StepResult:
    """Collect one batch of experience, update the policy, push the new weights to the generators.

    With `ppo.dynamic_sampling`, `more_prompts(r)` gives round r's extra prompts of this iteration.
    If any reward, log-prob, value or advantage is NaN/inf, the update and the push are skipped
    (weights unchanged); the learner itself skips any optimizer step whose loss or gradients are not finite.
    """
    timer = PhaseTimer()
    # 1. generate, split across the generator replicas (or take what the source sampled ahead);
    #    dynamic sampling scores each round and sets aside the prompts whose responses all scored the same
    rollouts = source.collect(batch, timer)
    sampled = (
        sample_informative(crew, source, (batch, rollouts), more_prompts, ppo, timer) if ppo.dynamic_sampling else None
    )
    if sampled is not None:
        batch, rollouts = sampled.batch, sampled.rollouts
    group = check_grouped(rollouts, batch.sampling.n)
    packed = pack([batch.prompts[r.prompt_index] for r in rollouts], [r.token_ids for r in rollouts], pad_id)
    mask = packed.response_mask

    # 2. score by every reward source (unless already scored), 3. reference log-probs, and the learner's
    #    old log-probs/values, all at once
    with timer("score_reference_values"):
        reward_weights = dict(reward_sources(ppo))
        scoring = score_calls(batch, rollouts, list(reward_weights)) if sampled is None else []
        scored, ref_logprobs, (old_logprobs, values) = score_reference_values(crew, packed, scoring)
        source_scores = sampled.scores if sampled is not None else dict(zip(reward_weights, scored))
        scores = sum(weight * source_scores[role] for role, weight in reward_weights.items())

    # 4. advantages: per-token rewards, then GAE with the values, or a critic-free estimator
    with timer("advantages"):
        rewards, kl, advantages, returns = advantages_of(scores, old_logprobs, ref_logprobs, values, mask, kl_coef, ppo)
    experience = Experience(packed, old_logprobs, ref_logprobs, values, scores, rewards, advantages, returns)
    checked = {name: getattr(experience, name) for name in CHECKED_FOR_NONFINITE}
    nonfinite = nonfinite_names({name: value for name, value in checked.items() if value is not None}, mask)

    # 5. update, unless the experience holds NaN/inf (an overlapping source samples the next batch meanwhile)
    update_calls = [] if nonfinite else [Call.to(LEARNER, LearnerRole.train_step, experience, kl_coef)]
    update = next(iter(source.alongside(update_calls, timer)), None)

    # 6. push weights
    versions = [weights.version]
    if update is not None and not update["update_skipped"]:
        with timer("push_weights"):
            versions = weights.push_from_learner()
    return StepResult(
        experience, rollouts, update, nonfinite, kl, kl_coef, versions, timer.seconds, group, source_scores, sampled
    )


def finite_only(metrics: dict) -> dict:
    """Numbers that can go into JSON lines, TensorBoard and Tune (non-finite ones are dropped)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
