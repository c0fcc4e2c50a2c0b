"""Sync and overlapped rollout sources, around a stand-in crew that answers generate calls at once."""

import pytest

from rlhf_ray.ppo.crew import Call
from rlhf_ray.ppo.rollouts import OverlappedRollouts, PhaseTimer, PromptBatch, SyncRollouts
from rlhf_ray.wire import Rollout, SamplingSpec

pytestmark = pytest.mark.unit


class AnsweringCrew:
    """Two generators; each generate call answers every prompt with [iteration]; other calls return 'updated'."""

    generator_names = ["rollout-generator-0", "rollout-generator-1"]

    def __init__(self):
        self.runs: list[tuple[str, list[str]]] = []

    def run(self, phase: str, calls: list[Call]) -> list:
        self.runs.append((phase, [call.method for call in calls]))
        return [
            [Rollout(i, [call.args[1].seed], [0.0], True) for i in range(len(call.args[0]))]
            if call.method == "generate"
            else "updated"
            for call in calls
        ]


def batch_of(iteration: int) -> PromptBatch:
    return PromptBatch(iteration, [0, 1, 2], [[1], [2], [3]], SamplingSpec(4, seed=iteration))


def test_sync_source_samples_each_batch_when_asked():
    crew, timer = AnsweringCrew(), PhaseTimer()
    source = SyncRollouts(crew)
    rollouts = source.collect(batch_of(0), timer)
    assert [r.prompt_index for r in rollouts] == [0, 1, 2] and {r.token_ids[0] for r in rollouts} == {0}
    assert source.alongside([Call("policy-learner", "train_step")], timer) == ["updated"]
    assert source.alongside([], timer) == []
    assert crew.runs == [("generate", ["generate", "generate"]), ("update", ["train_step"])]
    assert set(timer.seconds) == {"seconds_generate", "seconds_update"}


def test_overlapped_source_samples_the_next_batch_during_the_update_and_forgets_it_on_reset():
    crew = AnsweringCrew()
    source = OverlappedRollouts(crew, batch_of, iterations=3)
    first = PhaseTimer()
    source.collect(batch_of(0), first)
    assert source.alongside([Call("policy-learner", "train_step")], first) == ["updated"]
    assert crew.runs[-1] == ("update", ["train_step", "generate", "generate"])
    assert set(first.seconds) == {"seconds_generate", "seconds_update_and_generate_next"}

    second = PhaseTimer()
    ahead = source.collect(batch_of(1), second)  # sampled during the first update: no generate call now
    assert {r.token_ids[0] for r in ahead} == {1} and [r.prompt_index for r in ahead] == [0, 1, 2]
    assert "seconds_generate" not in second.seconds and len(crew.runs) == 2
    assert source.alongside([], second) == []  # no update (NaN experience): still samples ahead
    assert crew.runs[-1] == ("generate", ["generate", "generate"]) and "seconds_generate_next" in second.seconds

    source.reset()  # a restore: what was sampled ahead is dropped and sampled again
    source.collect(batch_of(2), PhaseTimer())
    assert crew.runs[-1] == ("generate", ["generate", "generate"]) and len(crew.runs) == 4
    last = PhaseTimer()
    assert source.alongside([Call("policy-learner", "train_step")], last) == ["updated"]  # last iteration
    assert crew.runs[-1] == ("update", ["train_step"]) and set(last.seconds) == {"seconds_update"}
