"""Does a run's resource request fit the cluster? Checked before any actor or worker group starts.

Ray queues an actor or a worker group that no node can hold and waits for it forever (Ray Train's
worker group times out every 60 s and tries again). `first_unplaceable` packs the requests onto the
nodes' total resources, largest first, and names the first request that fits nowhere; the driver
then fails in seconds with the stage, the request, the settings behind it and what each node has.
Pure: requests and nodes in, a message or None out.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Request:
    """One actor or Ray Train worker: what it holds while it lives, and the settings that set it."""

    name: str  # "sft worker 2", "ppo generator"
    resources: dict[str, float]  # {"CPU": 1.0, "GPU": 0.5}; zero amounts are dropped
    settings: str  # "resources.cpus_per_worker"

    def needs(self) -> dict[str, float]:
        return {key: amount for key, amount in self.resources.items() if amount > 0}


@dataclass
class Node:
    label: str  # its IP address, or its id
    resources: dict[str, float]
    used: dict[str, float] = field(default_factory=dict)

    def holds(self, request: Request) -> bool:
        return all(self.resources.get(k, 0.0) - self.used.get(k, 0.0) >= v - 1e-9 for k, v in request.needs().items())

    def take(self, request: Request) -> None:
        for key, amount in request.needs().items():
            self.used[key] = self.used.get(key, 0.0) + amount


class ResourcesUnavailable(ValueError):
    """A request that no node of the cluster can ever hold."""


def _amounts(resources: dict[str, float], keys) -> str:
    return ", ".join(f"{key} {resources.get(key, 0.0):g}" for key in keys)


def first_unplaceable(requests: list[Request], nodes: list[Node]) -> str | None:
    """None when every request fits on the nodes at once, else a message naming the first that does not."""
    order = sorted(requests, key=lambda r: (r.needs().get("GPU", 0.0), r.needs().get("CPU", 0.0)), reverse=True)
    for request in order:
        home = next((node for node in nodes if node.holds(request)), None)
        if home is not None:
            home.take(request)
            continue
        keys = sorted(request.needs())
        placed = any(node.used for node in nodes)
        have = "; ".join(
            f"node {n.label}: {_amounts(n.resources, keys)} in all, {_amounts(n.used, keys)} taken" for n in nodes
        )
        return (
            f"{request.name} needs {_amounts(request.needs(), keys)} ({request.settings}), and no node of the "
            f"cluster can hold it{' beside the other roles placed first' if placed else ''}: {have or 'no nodes'}. "
            "Ask for less, or attach to a cluster that has more (resources.address)"
        )
    return None
