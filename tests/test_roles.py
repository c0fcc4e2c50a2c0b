"""The role contracts: each actor class matches its Protocol, and the driver side names methods only through them."""

import ast
import inspect
import typing
from pathlib import Path

import pytest

from actors.policy_learner import PolicyLearner
from actors.reference_model import ReferenceModel
from actors.reward_model import RewardModel
from actors.reward_sources import FunctionReward, HttpReward
from actors.rollout_generator import RolloutGenerator
from rlhf_ray.ppo.crew import Call
from rlhf_ray.roles import LEARNER, GeneratorRole, LearnerRole, ReferenceRole, RewardRole, remote_call

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
CONTRACTS = [
    (GeneratorRole, RolloutGenerator),
    (LearnerRole, PolicyLearner),
    (RewardRole, RewardModel),
    (RewardRole, FunctionReward),
    (RewardRole, HttpReward),
    (ReferenceRole, ReferenceModel),
]


def parameters(method) -> list[tuple]:
    """Names, kinds and defaults; without the `_ray_trace_ctx` Ray adds to a class once it was made an actor."""
    return [
        (p.name, p.kind, p.default) for p in inspect.signature(method).parameters.values() if p.name != "_ray_trace_ctx"
    ]


def protocol_methods(protocol) -> list[str]:
    return [name for name, value in vars(protocol).items() if inspect.isfunction(value) and not name.startswith("_")]


@pytest.mark.parametrize("protocol, actor", CONTRACTS, ids=lambda c: c.__name__)
def test_each_actor_has_its_roles_methods_with_the_same_signature_and_types(protocol, actor):
    assert protocol_methods(protocol)
    for name in protocol_methods(protocol):
        assert hasattr(actor, name), f"{actor.__name__} has no method {name} of {protocol.__name__}"
        wanted, given = getattr(protocol, name), getattr(actor, name)
        assert parameters(given) == parameters(wanted), f"{actor.__name__}.{name}"
        hints = {k: v for k, v in typing.get_type_hints(given).items() if k != "_ray_trace_ctx"}
        assert hints == typing.get_type_hints(wanted), f"{actor.__name__}.{name}"


def test_a_call_with_arguments_that_do_not_fit_fails_where_it_is_built():
    with pytest.raises(TypeError, match=r"LearnerRole.train_step: missing a required argument: 'experience'"):
        Call.to(LEARNER, LearnerRole.train_step)
    with pytest.raises(TypeError, match=r"RewardRole.score: too many positional arguments"):
        Call.to("reward", RewardRole.score, [[1]], [[2]], [], 3)
    call = Call.to("generator", GeneratorRole.generate, [[1, 2]], None, index_offset=4)
    assert (call.method, call.args, call.kwargs) == ("generate", ([[1, 2]], None), {"index_offset": 4})


def test_remote_call_checks_the_arguments_before_reaching_the_handle():
    class Handle:
        class score:  # noqa: N801 (stands for a Ray actor method)
            @staticmethod
            def remote(*args):
                return ("sent", args)

    assert remote_call(Handle(), RewardRole.score, [[1]], [[2]]) == ("sent", ([[1]], [[2]]))
    with pytest.raises(TypeError, match="RewardRole.score"):
        remote_call(Handle(), RewardRole.score, [[1]])


# ray_session.py submits plain tasks (the shared-folder check), never actor methods.
REMOTE_ALLOWED = {
    "rlhf_ray/roles.py",
    "rlhf_ray/ppo/crew.py",
    "rlhf_ray/evaluation/launch.py",
    "rlhf_ray/ray_session.py",
}


def calls_in(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            yield node


def test_the_driver_side_names_actor_methods_only_through_the_role_protocols():
    problems = []
    for path in sorted((ROOT / "rlhf_ray").rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        for node in calls_in(path):
            func = node.func
            where = f"{rel}:{node.lineno}"
            if isinstance(func, ast.Name) and func.id == "Call" and rel != "rlhf_ray/ppo/crew.py":
                problems.append(f"{where}: build calls with Call.to(role, SomeRole.method, ...)")
            if (
                isinstance(func, ast.Attribute)
                and func.attr == "call"
                and len(node.args) >= 3
                and isinstance(node.args[2], ast.Constant)
            ):
                problems.append(f"{where}: crew.call with a method name string")
            if isinstance(func, ast.Attribute) and func.attr == "remote" and rel not in REMOTE_ALLOWED:
                problems.append(f"{where}: .remote() outside the crew and roles.remote_call")
            if (
                rel == "rlhf_ray/evaluation/launch.py"
                and isinstance(func, ast.Attribute)
                and func.attr == "remote"
                and isinstance(func.value, ast.Attribute)
            ):
                problems.append(f"{where}: call actor methods with roles.remote_call")
    assert not problems, "\n".join(problems)


def test_one_ppo_iteration_reads_as_its_numbered_phases_on_one_screen():
    from rlhf_ray.ppo.driver import ppo_step

    source = inspect.getsource(ppo_step)
    assert len(source.splitlines()) < 60
    assert all(f"{n}. " in source for n in range(1, 7))  # the phases, numbered in comments
