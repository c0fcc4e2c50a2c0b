"""DAPO-style dynamic sampling (Yu et al. 2025): keep only the prompts whose responses got different rewards.

A prompt whose k responses all scored the same gets zero advantage from a group estimator, so it adds
nothing but cost to the update. With `ppo.dynamic_sampling`, the driver scores each sampled batch first,
sets such groups aside, and samples more prompts (round 1, 2, ... of the iteration, each a batch that
depends on the iteration and the round alone) until `rollout_batch_size` informative groups are found
or `ppo.max_sampling_rounds` rounds have run. A batch still short after the last round is filled with
groups that were set aside, so every iteration updates on the same number of responses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlhf_ray.ppo.rollouts import PromptBatch
from rlhf_ray.wire import Rollout


@dataclass
class Group:
    """One prompt and its k responses with their scores by reward source."""

    prompt_id: int
    prompt: list[int]
    row: object  # PromptRow or None
    rollouts: list[Rollout]
    scores: dict[str, torch.Tensor]  # (k,) per reward source
    total: torch.Tensor  # (k,) the weighted sum

    @property
    def informative(self) -> bool:
        return bool((self.total != self.total[0]).any())


def split_into_groups(
    batch: PromptBatch, rollouts: list[Rollout], scores: dict[str, torch.Tensor], weights: dict[str, float]
) -> list[Group]:
    """The batch's rollouts (grouped by prompt, k each, in prompt order) and scores as one Group per prompt."""
    k = batch.sampling.n
    total = sum(weights[role] * s for role, s in scores.items())
    groups = []
    for g in range(len(batch.prompts)):
        part = slice(g * k, (g + 1) * k)
        groups.append(
            Group(
                batch.prompt_ids[g],
                batch.prompts[g],
                batch.rows[g] if batch.rows is not None else None,
                rollouts[part],
                {role: s[part] for role, s in scores.items()},
                total[part],
            )
        )
    return groups


def joined(groups: list[Group], like: PromptBatch) -> tuple[PromptBatch, list[Rollout], dict[str, torch.Tensor]]:
    """The groups as one batch: prompts in group order, each rollout pointing at its prompt, scores concatenated."""
    rollouts = []
    for index, group in enumerate(groups):
        for r in group.rollouts:
            rollouts.append(Rollout(index, r.token_ids, r.logprobs, r.finished))
    batch = PromptBatch(
        like.iteration,
        [g.prompt_id for g in groups],
        [g.prompt for g in groups],
        like.sampling,
        [g.row for g in groups] if like.rows is not None else None,
    )
    scores = {role: torch.cat([g.scores[role] for g in groups]) for role in groups[0].scores}
    return batch, rollouts, scores


@dataclass
class Sampled:
    batch: PromptBatch
    rollouts: list[Rollout]
    scores: dict[str, torch.Tensor]
    metrics: dict[str, float]


def informative_groups(
    first: tuple[PromptBatch, list[Rollout]],
    sample_round: Callable[[int], tuple[PromptBatch, list[Rollout]]],
    score: Callable[[PromptBatch, list[Rollout]], dict[str, torch.Tensor]],
    weights: dict[str, float],
    max_rounds: int,
) -> Sampled:
    """Sample and score rounds until the first batch's number of prompts have informative groups (or
    `max_rounds`); fill what is missing with the uninformative groups, in the order they were sampled."""
    batch, rollouts = first
    wanted = len(batch.prompts)
    kept: list[Group] = []
    set_aside: list[Group] = []
    rounds = 0
    while True:
        for group in split_into_groups(batch, rollouts, score(batch, rollouts), weights):
            (kept if group.informative else set_aside).append(group)
        rounds += 1
        if len(kept) >= wanted or rounds >= max_rounds:
            break
        batch, rollouts = sample_round(rounds)
    chosen = (kept + set_aside)[:wanted]
    sampled_groups = len(kept) + len(set_aside)
    batch, rollouts, scores = joined(chosen, first[0])
    metrics = {
        "sampling_rounds": rounds,
        "discarded_groups": sampled_groups - wanted,
        "filled_zero_advantage_groups": max(wanted - len(kept), 0),
        "sampled_tokens": sum(len(r.token_ids) for group in kept + set_aside for r in group.rollouts),
    }
    return Sampled(batch, rollouts, scores, metrics)
