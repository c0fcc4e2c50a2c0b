"""Where an iteration's rollouts come from: sampled when needed, or sampled ahead during the previous update.

With `ppo.overlap_generation`, the generators sample iteration i + 1's prompts while the learner
updates on iteration i, so those responses come from the policy one update behind (PPO's importance
ratio, computed against the learner's own old log-probs, accounts for it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

from rlhf_ray.ppo.crew import ActorCrew, Call
from rlhf_ray.roles import GeneratorRole
from rlhf_ray.wire import PromptRow, Rollout, SamplingSpec


@dataclass
class PromptBatch:
    """What iteration `iteration` samples; it depends on the iteration number alone."""

    iteration: int
    prompt_ids: list[int]  # indices into the prompt set (named when a run stops on NaN)
    prompts: list[list[int]]  # token ids
    sampling: SamplingSpec
    rows: list[PromptRow] | None = None  # the prompts' text and extra fields, for function and HTTP rewards


class PhaseTimer:
    """Seconds per named phase, as `seconds_<phase>` metrics."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        yield
        key = f"seconds_{phase}"
        self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start  # (a phase may run twice)


class RolloutSource(Protocol):
    def collect(self, batch: PromptBatch, timer: PhaseTimer) -> list[Rollout]:
        """The batch's rollouts (times `generate` when it samples them now)."""
        ...

    def alongside(self, calls: list[Call], timer: PhaseTimer) -> list:
        """Run `calls` (the update) and return their results; an overlapping source samples ahead meanwhile."""
        ...

    def reset(self) -> None:
        """Forget anything sampled ahead (its weights are gone after a restore)."""
        ...


def split_evenly(items: list, parts: int) -> list[list]:
    size, extra = divmod(len(items), parts)
    chunks, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        chunks.append(items[start:end])
        start = end
    return chunks


def generate_calls(crew: ActorCrew, batch: PromptBatch) -> tuple[list[list[int]], list[Call]]:
    """The prompt batch split across the generator replicas: (prompt indices per shard, one call per shard)."""
    shards = [s for s in split_evenly(list(range(len(batch.prompts))), len(crew.generator_names)) if s]
    calls = [
        Call.to(name, GeneratorRole.generate, [batch.prompts[i] for i in shard], batch.sampling, shard[0])
        for name, shard in zip(crew.generator_names, shards)
    ]
    return shards, calls


def gather_rollouts(shards: list[list[int]], results: list[list[Rollout]]) -> list[Rollout]:
    """The shards' rollouts in one list, each pointing at its prompt in the whole batch."""
    rollouts = []
    for shard, shard_rollouts in zip(shards, results):
        for r in shard_rollouts:
            r.prompt_index = shard[r.prompt_index]
            rollouts.append(r)
    return rollouts


class SyncRollouts:
    """Sample each batch when its iteration starts, with the newest weights."""

    def __init__(self, crew: ActorCrew):
        self.crew = crew

    def collect(self, batch: PromptBatch, timer: PhaseTimer) -> list[Rollout]:
        with timer("generate"):
            shards, calls = generate_calls(self.crew, batch)
            return gather_rollouts(shards, self.crew.run("generate", calls))

    def alongside(self, calls: list[Call], timer: PhaseTimer) -> list:
        if not calls:
            return []
        with timer("update"):
            return self.crew.run("update", calls)

    def reset(self) -> None:
        pass


class OverlappedRollouts(SyncRollouts):
    """Sample the next iteration's batch during this iteration's update (none after the last iteration)."""

    def __init__(self, crew: ActorCrew, batch_of: Callable[[int], PromptBatch], iterations: int):
        super().__init__(crew)
        self.batch_of, self.iterations = batch_of, iterations
        self.current: int | None = None  # the iteration collected last
        self.ahead: tuple[int, list[Rollout]] | None = None  # (iteration, rollouts) sampled ahead

    def collect(self, batch: PromptBatch, timer: PhaseTimer) -> list[Rollout]:
        ahead, self.ahead, self.current = self.ahead, None, batch.iteration
        if ahead is not None and ahead[0] == batch.iteration:
            return ahead[1]
        return super().collect(batch, timer)

    def alongside(self, calls: list[Call], timer: PhaseTimer) -> list:
        following = self.current + 1 if self.current is not None else self.iterations
        if following >= self.iterations:
            return super().alongside(calls, timer)
        shards, next_calls = generate_calls(self.crew, self.batch_of(following))
        with timer("update_and_generate_next" if calls else "generate_next"):
            results = self.crew.run("update" if calls else "generate", calls + next_calls)
        self.ahead = (following, gather_rollouts(shards, results[len(calls) :]))
        return results[: len(calls)]

    def reset(self) -> None:
        self.ahead = self.current = None
