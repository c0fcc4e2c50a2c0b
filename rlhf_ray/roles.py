"""The four PPO roles: their actor names, and the methods the driver and `rlhf-ray eval` call on them.

Callers name a method by its Protocol attribute (`RewardRole.score`), never by a string, so a
renamed or mis-called method fails where the call is built (and in a type checker), not inside a
remote actor. tests/test_roles.py checks that each actor class matches its Protocol.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from rlhf_ray.wire import (
    AdapterPayload,
    Experience,
    MergedWeights,
    PackedBatch,
    PromptRow,
    Rollout,
    SamplingSpec,
    UpdateStats,
)

GENERATOR_PREFIX = "rollout-generator-"
LEARNER = "policy-learner"
REWARD = "reward-model"  # the trained reward model
REFERENCE = "reference-model"


def reward_role(kind: str, index: int) -> str:
    """The actor name of `ppo.rewards[index]`: the trained RM is `REWARD`, the others are numbered by position."""
    return REWARD if kind == "model" else f"reward-{kind}-{index}"


class GeneratorRole(Protocol):
    def generate(
        self, prompt_token_ids: list[list[int]], sampling: SamplingSpec, index_offset: int = 0
    ) -> list[Rollout]: ...

    def load_adapter(self, version: int, adapter: AdapterPayload | str | Path) -> int: ...

    def load_merged_weights(self, version: int, weights: MergedWeights) -> int: ...


class LearnerRole(Protocol):
    def logprobs_and_values(self, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def train_step(self, experience: Experience, kl_coef: float = 0.0) -> UpdateStats: ...

    def export_adapter(self) -> AdapterPayload: ...

    def export_merged_weights(self) -> MergedWeights: ...

    def save(self, folder: str | Path) -> None: ...

    def load(self, folder: str | Path) -> None: ...

    def export_merged(self, folder: str | Path, tokenizer_path: str) -> None: ...


class RewardRole(Protocol):
    """Every reward source: the trained RM (`REWARD`), and the function and HTTP sources (`reward_role`)."""

    def score(
        self, prompts: list[list[int]], responses: list[list[int]], rows: list[PromptRow] | None = None
    ) -> torch.Tensor:
        """(B,) rewards. `rows` (the prompts' text and extra fields) is what function and HTTP sources read."""
        ...


class ReferenceRole(Protocol):
    def logprobs(self, batch: PackedBatch) -> torch.Tensor: ...


def check_arguments(method: Callable[..., Any], args: tuple, kwargs: dict | None = None) -> None:
    """TypeError, naming the method, unless `method(self, *args, **kwargs)` would bind."""
    try:
        inspect.signature(method).bind(None, *args, **(kwargs or {}))
    except TypeError as err:
        raise TypeError(f"{method.__qualname__}: {err}") from None


def remote_call(handle, method: Callable[..., Any], *args):
    """`handle.<method>.remote(*args)` for a Protocol method, with its arguments checked here first."""
    check_arguments(method, args)
    return getattr(handle, method.__name__).remote(*args)
