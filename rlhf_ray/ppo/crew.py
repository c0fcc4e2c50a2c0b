"""The PPO actors as a crew that survives deaths: every call has a deadline, a dead actor is re-created.

The driver never calls an actor handle directly; it hands `ActorCrew.run` a phase name and a list of
`Call`s. Calls run concurrently. When an actor dies (process killed, node lost) the crew checks that
an alive node can still hold it, re-creates it from its `RoleSpec`, lets `on_restart` restore its
state (the driver reloads the generator's adapter), and issues the lost call again. A stateful role
listed in `replay_roles` (the policy learner) is re-created too, but its call is not re-issued:
`RoleLost` goes up to the driver, which restores the learner from its last checkpoint and replays
from there.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Concatenate, ParamSpec

from rlhf_ray.checkpoints import CheckpointError
from rlhf_ray.placement import Request
from rlhf_ray.ray_session import require_fits
from rlhf_ray.rewards.checks import RewardError
from rlhf_ray.roles import GENERATOR_PREFIX, LEARNER, check_arguments

P = ParamSpec("P")


def wait_until_names_free(names: list[str], namespace: str | None, still_alive: str, timeout_s: float = 60.0) -> None:
    """Wait until no actor holds any of `names` (Ray reaps a dead driver's or a killed actor's name a little
    later); after `timeout_s`, raise RuntimeError with `still_alive` and the name."""
    import ray

    deadline = time.monotonic() + timeout_s
    for name in names:
        while True:
            try:
                ray.get_actor(name, namespace=namespace)
            except ValueError:
                break  # no such actor
            if time.monotonic() > deadline:
                raise RuntimeError(f"{still_alive} after {timeout_s:.0f} s: actor '{name}' (namespace '{namespace}')")
            time.sleep(0.2)


@dataclass
class RoleSpec:
    """How to create one named actor (and create it again after it dies)."""

    name: str
    cls: type
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)  # ray .options(): namespace, num_cpus, num_gpus


@dataclass
class Call:
    """One remote method call on the actor of `role`; build it with `Call.to` from a roles.py Protocol method."""

    role: str
    method: str  # the method's name (tests also build calls on their own actors with a plain name)
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    @classmethod
    def to(cls, role: str, method: Callable[Concatenate[Any, P], Any], *args: P.args, **kwargs: P.kwargs) -> Call:
        """TypeError here, in the driver, when the arguments do not fit the method."""
        check_arguments(method, args, kwargs)
        return cls(role, method.__name__, args, kwargs)


class RoleLost(RuntimeError):
    """A stateful actor died and was re-created; the caller must restore its state and replay."""

    def __init__(self, role: str, phase: str, cause: str):
        super().__init__(f"{role} died during {phase}: {cause}")
        self.role, self.phase = role, phase


# Errors raised inside an actor whose message names what went wrong and where (a reward function's row,
# a checkpoint file refused on resume).
SELF_EXPLAINING = (RewardError, CheckpointError)


class RoleKeepsDying(RuntimeError):
    pass


class CrewStopped(RuntimeError):
    """A call was lost because the run stopped its actors (Ctrl-C, SIGTERM): nothing is re-created."""


class ActorCallTimeout(TimeoutError):
    pass


def _actor_place(_actor) -> tuple[int, str]:
    """The actor's process id, and its node's IP address and id (several nodes may share an address)."""
    import ray

    return os.getpid(), f"{ray.util.get_node_ip_address()} node {ray.get_runtime_context().get_node_id()[:8]}"


def _death_errors() -> tuple[type, ...]:
    from ray import exceptions

    return (
        exceptions.RayActorError,
        exceptions.WorkerCrashedError,
        exceptions.NodeDiedError,
        exceptions.OutOfMemoryError,
    )


class ActorCrew:
    def __init__(
        self,
        specs: list[RoleSpec],
        *,
        max_restarts: int,
        timeout_s: float,
        replay_roles: tuple[str, ...] = (LEARNER,),
        log: Callable[[str], None] = print,
        requests: dict[str, Request] | None = None,
    ):
        self.specs = {spec.name: spec for spec in specs}
        self.requests = requests or {}  # what each actor that takes resources needs of a node
        self.max_restarts, self.timeout_s, self.replay_roles, self.log = max_restarts, timeout_s, replay_roles, log
        self.handles: dict[str, Any] = {}
        self.pids: dict[str, int] = {}
        self.restarts = {name: 0 for name in self.specs}
        self.on_restart: Callable[[str, Any], None] | None = None
        self.before_create: Callable[[], None] | None = None  # runs before an actor is created again
        self.stopped = False  # set by stop(): a role that dies after it is not re-created
        try:
            for spec in specs:
                self.handles[spec.name] = self._create(spec)
            self._wait_started(list(self.specs))
        except BaseException:
            self.stop()  # one actor failed to start: do not leave the others running
            raise

    @property
    def generator_names(self) -> list[str]:
        return [name for name in self.specs if name.startswith(GENERATOR_PREFIX)]

    @property
    def total_restarts(self) -> int:
        return sum(self.restarts.values())

    def handle(self, role: str):
        return self.handles[role]

    def _create(self, spec: RoleSpec):
        import ray

        return (
            ray.remote(spec.cls)
            .options(**spec.options, max_restarts=0, max_task_retries=0)
            .remote(*spec.args, **spec.kwargs)
        )

    def _wait_started(self, roles: list[str]) -> None:
        """Wait for the constructors (model load, vLLM engine start); note and say each actor's process and node."""
        refs = {role: self.handles[role].__ray_call__.remote(_actor_place) for role in roles}
        places = []
        for role, (pid, node) in zip(refs, self._get_all("start", refs)):
            self.pids[role] = pid
            places.append(f"{role} on {node} (pid {pid})")
        self.log(f"[ppo] actors: {'; '.join(places)}")

    def _get_all(self, phase: str, refs: dict[str, Any]) -> list:
        import ray

        deadline = time.monotonic() + self.timeout_s
        for role, ref in refs.items():
            try:
                ray.get(ref, timeout=max(deadline - time.monotonic(), 0.0))
            except ray.exceptions.GetTimeoutError:
                raise ActorCallTimeout(
                    f"{role} did not finish {phase} within {self.timeout_s:.0f} s (resources.call_timeout_s)"
                ) from None
        return ray.get(list(refs.values()))

    def restart(self, role: str, phase: str, cause: str) -> None:
        """Kill what is left of `role`, create it again, wait for it, and let `on_restart` restore it. A new actor
        that dies while it starts (placed on a node that was dying too) counts as one more restart."""
        while True:
            self._create_again(role, phase, cause)
            try:
                self._wait_started([role])
                break
            except _death_errors() as err:
                phase, cause = "start", type(err).__name__
        if self.on_restart is not None:
            self.on_restart(role, self.handles[role])

    def _create_again(self, role: str, phase: str, cause: str) -> None:
        import ray

        if self.stopped:
            raise CrewStopped(f"{role} was stopped with the run")
        self.restarts[role] += 1
        if self.restarts[role] > self.max_restarts:
            raise RoleKeepsDying(
                f"{role} died {self.restarts[role]} times (resources.max_actor_restarts="
                f"{self.max_restarts}); last time during {phase}: {cause}"
            )
        self.log(
            f"[ppo] {role} (pid {self.pids.get(role)}) died during {phase}: {cause}; "
            f"re-creating it ({self.restarts[role]}/{self.max_restarts})"
        )
        try:
            ray.kill(self.handles[role], no_restart=True)
        except Exception:  # already gone
            pass
        wait_until_names_free(
            [role], self.specs[role].options.get("namespace"), f"the dead actor {role} still holds its name"
        )
        if role in self.requests:  # its node may be gone, and with it the only place it could run
            require_fits(f"ppo: {role} died during {phase} ({cause}) and cannot be re-created", [self.requests[role]])
        if self.before_create is not None:
            self.before_create()
        self.handles[role] = self._create(self.specs[role])

    def run(self, phase: str, calls: list[Call]) -> list:
        """Results of `calls` in order. Lost calls to stateless roles are issued again after a restart."""
        import ray

        deaths = _death_errors()
        pending = {self._submit(call): index for index, call in enumerate(calls)}
        results: list = [None] * len(calls)
        deadline = time.monotonic() + self.timeout_s
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(deadline - time.monotonic(), 0.0))
            if not ready:
                waiting = sorted({calls[i].role for i in pending.values()})
                raise ActorCallTimeout(
                    f"{', '.join(waiting)} did not finish {phase} within {self.timeout_s:.0f} s "
                    "(resources.call_timeout_s)"
                )
            index = pending.pop(ready[0])
            call = calls[index]
            try:
                results[index] = ray.get(ready[0])
            except ray.exceptions.RayTaskError as err:
                if isinstance(err.cause, SELF_EXPLAINING):  # its message says all; the remote traceback would not
                    raise err.cause from None
                raise
            except deaths as err:
                cause = type(err).__name__
                self.restart(call.role, phase, cause)
                if call.role in self.replay_roles:
                    raise RoleLost(call.role, phase, cause) from err
                pending[self._submit(call)] = index
                deadline = time.monotonic() + self.timeout_s
        return results

    def run_inside(self, phase: str, role: str, function: Callable[..., Any], *args):
        """`function(actor, *args)` in the process of the actor of `role` (on its node), a call like any other:
        its deadline, and the actor's death handled as above."""
        return self.run(phase, [Call(role, "__ray_call__", (function, *args))])[0]

    def call(self, phase: str, role: str, method: Callable[..., Any] | str, *args):
        """One call's result; `method` is a roles.py Protocol method (or a plain name, for tests' own actors)."""
        call = Call(role, method, args) if isinstance(method, str) else Call.to(role, method, *args)
        return self.run(phase, [call])[0]

    def _submit(self, call: Call):
        return getattr(self.handles[call.role], call.method).remote(*call.args, **call.kwargs)

    def stop(self) -> None:
        import ray

        self.stopped = True
        for handle in self.handles.values():
            try:
                ray.kill(handle, no_restart=True)
            except Exception:
                pass
