"""Attach to a running Ray cluster, or start a local one (dashboard on 127.0.0.1 only)."""

from __future__ import annotations

import os
import signal
import socket
import threading
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from rlhf_ray.config import ResourcesConfig, RunConfig
from rlhf_ray.placement import Node, Request, ResourcesUnavailable, first_unplaceable
from rlhf_ray.storage import RunStore

DEFAULT_DASHBOARD_PORT = 8265
T = TypeVar("T")


def connect(resources: ResourcesConfig) -> str:
    """`resources.address`, else RAY_ADDRESS, else a new local Ray. Returns what was used."""
    import ray

    if ray.is_initialized():
        return "already connected"
    address = resources.address or os.environ.get("RAY_ADDRESS")
    if address:
        check_reachable(address, "resources.address" if resources.address else "RAY_ADDRESS")
        ray.init(address=address)
        used = f"attached to {address}"
    else:
        used = _start_local_ray()
    exit_on_sigterm()  # ray.init installs a SIGTERM handler of its own that aborts the process
    return used


def exit_on_sigterm() -> None:
    """`ray job stop` sends SIGTERM: exit with 143 through the normal path, so `finally` blocks stop the actors."""

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


class ClusterUnreachable(ConnectionError):
    """Nothing answers at the Ray address the run was given."""


def check_reachable(address: str, where: str, timeout_s: float = 5.0) -> None:
    """A TCP connect to the address's host and port (GCS or Ray Client), so that a stale address fails in
    seconds naming itself instead of Ray retrying for minutes. `auto`, `local` and forms without a port are
    left to Ray."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise ClusterUnreachable(
            f"{where} {address}: nothing answers at {host}:{port} ({err.strerror or err}). Start a cluster there "
            "(`ray start --head`), fix the address, or leave it unset to start a local Ray"
        ) from None


def _start_local_ray() -> str:
    """A new local cluster of this run's own, apart from any other Ray on the machine.

    `address="local"` never attaches to a stale or foreign cluster found in /tmp/ray. Ray's own
    helpers inside the cluster (Ray Train's placement-group cleaner, for one) look their cluster
    up through the state API; with two local clusters on one machine that lookup finds both and
    fails ("Found multiple active Ray instances"). Every worker of this run is therefore told its
    cluster's API server address (`RAY_API_SERVER_ADDRESS`), so two runs never reach each other.
    """
    import ray
    from ray._private.services import find_gcs_addresses

    others = find_gcs_addresses()
    port = dashboard_port()
    api_server = f"http://127.0.0.1:{port}"
    ray.init(
        address="local",
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": api_server}},
    )
    started = f"started a local Ray (dashboard {api_server})"
    if others:
        started += (
            f"; {len(others)} other Ray instance(s) run on this machine and share its CPU cores "
            "(set resources.address to attach to one instead)"
        )
    return started


def dashboard_port() -> int:
    """8265 (Ray's default) when it is free on loopback, else a free port the system picks."""
    for port in (DEFAULT_DASHBOARD_PORT, 0):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise OSError("no free TCP port on 127.0.0.1 for the Ray dashboard")


def require_fits(stage: str, requests: list[Request]) -> None:
    """Fail now, naming the request, when the connected cluster's alive nodes can never hold `requests` at once."""
    import ray

    nodes = [Node(n["NodeManagerAddress"], dict(n["Resources"])) for n in ray.nodes() if n["Alive"]]
    problem = first_unplaceable(requests, nodes)
    if problem:
        raise ResourcesUnavailable(f"{stage}: {problem}")


def run_interruptibly(call: Callable[[], T]) -> T:
    """`call()` (blocking Ray calls such as `TorchTrainer.fit` or PPO's loop) in a helper thread, so that Ctrl-C and
    SIGTERM reach this process's own handlers at once, in the main thread, outside Ray. Ray Train installs its own
    SIGINT handler when `fit` runs in the main thread (it aborts the run but ends the process with exit 1 and no
    word), and an exception raised by a signal handler inside Ray's blocking `wait` can end the process with exit
    1 and no word too. The worker group or actors belong to this driver and end with it; the checkpoints already
    written stay usable."""
    import ray

    if threading.current_thread() is not threading.main_thread() or (
        ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
    ):
        return call()  # (signals reach only a driver's main thread: here there is none to hand over to)
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["value"] = call()
        except BaseException as err:  # noqa: BLE001 - handed to the caller's thread as it is
            outcome["error"] = err

    thread = threading.Thread(target=target, name="rlhf-ray-blocking-call", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


class FolderNotShared(OSError):
    """run.output_dir is not the same folder on every node of the cluster."""


def _read_marker(path: str) -> str | None:
    try:
        with open(path) as handle:
            return handle.read()
    except OSError:
        return None


def require_shared_folder(folder: Path, setting: str = "run.output_dir") -> None:
    """On a cluster of several nodes: fail now, naming the first node that does not see a marker this driver
    writes into `folder` (checkpoints, metrics and exports are written by whichever node holds the writer).
    One task per other alive node, pinned to it, reads the marker back."""
    import ray

    if not any(n["Alive"] and n["NodeID"] != ray.get_runtime_context().get_node_id() for n in ray.nodes()):
        return
    existing = next(p for p in (folder, *folder.parents) if p.exists())  # a folder to be made lies on its mount
    marker = existing / f".shared-check-{uuid.uuid4().hex}"
    marker.write_text(marker.name)
    try:
        seen = _on_each_other_node(_read_marker, str(marker))
    finally:
        marker.unlink(missing_ok=True)
    for node, text in seen:
        if text != marker.name:
            raise FolderNotShared(
                f"{setting} {folder} is not shared: node {node['NodeManagerAddress']} "
                f"({node['NodeID'][:8]}) does not see a file this driver wrote there. Use a folder every node "
                "mounts at the same path (checkpoints, metrics and exports are written from the nodes that hold "
                "the workers and actors)"
            )


def _on_each_other_node(function, *args) -> list[tuple[dict, object]]:
    """`function(*args)` in one task pinned to each alive node but this driver's: [(node, result)]."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    others = [n for n in ray.nodes() if n["Alive"] and n["NodeID"] != here]
    task = ray.remote(num_cpus=0)(function)
    pinned = [
        task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(*args)
        for n in others
    ]
    return list(zip(others, ray.get(pinned)))


def require_store_on_every_node(store: RunStore, inputs: Sequence[Path]) -> None:
    """With run.output_dir an object-store URI: check that every node reaches the store (a marker this driver
    writes is read back on each other node), then bring every node's working copy of `inputs` (those inside
    the run folder) up to date, so actors read them locally wherever they start."""
    marker = store.check()
    try:
        for node, text in _on_each_other_node(_read_store_marker, store, marker):
            if text != marker:
                raise FolderNotShared(
                    f"run.output_dir {store.shown}: node {node['NodeManagerAddress']} ({node['NodeID'][:8]}) "
                    "cannot read a file this driver wrote to the store; give every node the store's credentials "
                    "and network access"
                )
    finally:
        store.delete(marker)
    pull_on_every_node(store, inputs)


def pull_on_every_node(store: RunStore, inputs: Sequence[Path]) -> None:
    """Every alive node's working copy of `inputs` (those inside the run folder) brought up to date."""
    inside = [str(path) for path in inputs if store.relative(path) is not None]
    if inside:
        store.pull_paths(*inside)
        _on_each_other_node(_pull, store, inside)


def _read_store_marker(store: RunStore, name: str) -> str | None:
    return store.read_marker(name)


def _pull(store: RunStore, paths: list[str]) -> int:
    return store.pull_paths(*paths)


def require_shared_output(run: RunConfig, folder: Path, inputs: Sequence[Path] = ()) -> None:
    """Before a stage starts on a cluster: every node must reach the run's outputs, a shared folder or the
    object store of a URI `run.output_dir` (then every node's working copy of `inputs` is brought up to date:
    the model folders and checkpoints the stage's actors read)."""
    if run.store is None:
        require_shared_folder(folder)
    else:
        require_store_on_every_node(run.store, inputs)
