"""A Ray cluster of several nodes on this one machine, for the multi-node tests: each node is its own
`ray start --block` process group (its own raylet, object store and agents, on ports of its own), joined to
one head. Real processes, as on a cluster; a node is lost by killing its raylet."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalCluster:
    """`ray start --head` plus worker nodes; `env` is what a driver (or `ray` command) attaching to it needs."""

    def __init__(self, root: Path, head_cpus: float = 1):
        self.root = root
        home = root / "home"
        home.mkdir(parents=True)
        self.env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "HOME": str(home)}
        self.env["RAY_AUTH_MODE"] = "token"
        for inherited in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
            self.env.pop(inherited, None)
        made = subprocess.run(
            [f"{BIN}/ray", "get-auth-token", "--generate"], env=self.env, capture_output=True, text=True, timeout=120
        )
        assert made.returncode == 0, made.stderr[-2000:]
        # a lost node is noticed in about 3 s instead of Ray's default of about 30
        self.env.update(RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="3")
        self.temp_dir = f"/tmp/rlhf-ray-nodes-{free_port()}"  # short: Ray's socket paths must stay < 108 chars
        self.nodes: dict[str, subprocess.Popen] = {}
        self.ids: dict[str, str] = {}  # node name -> Ray node id
        self.lost: set[str] = set()
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        self._start("head", ["--head", f"--port={port}", "--include-dashboard=false"], head_cpus, {})
        self.wait_for_nodes(1)

    def add_node(self, name: str, cpus: float, resources: dict[str, float], private_dir: Path | None = None) -> None:
        """A worker node; with `private_dir`, in a mount namespace of its own where that folder is an empty
        tmpfs: a node that does not share the folder with the others, as on a cluster without shared storage."""
        self._start(name, [f"--address={self.address}"], cpus, resources, private_dir)
        self.wait_for_nodes(len(self.nodes) - len(self.lost))

    def remove_node(self, name: str) -> None:
        os.killpg(self.nodes[name].pid, signal.SIGTERM)
        self.nodes[name].wait(timeout=60)
        self.lost.add(name)
        self.wait_for_nodes(len(self.nodes) - len(self.lost))

    def _start(
        self, name: str, role: list[str], cpus: float, resources: dict[str, float], private_dir: Path | None = None
    ) -> None:
        log = open(self.root / f"{name}.log", "w")
        ports = ["--node-manager-port", "--object-manager-port", "--metrics-export-port"]
        ports += ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port"]
        command = [f"{BIN}/ray", "start", "--block", *role, f"--num-cpus={cpus}", f"--temp-dir={self.temp_dir}"]
        command += [f"{flag}={free_port()}" for flag in ports]
        command += [f"--resources={json.dumps(resources)}"] if resources else []
        if private_dir is not None:
            mount = 'mount -t tmpfs none "$0" && exec "$@"'
            command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", mount, str(private_dir), *command]
        self.nodes[name] = subprocess.Popen(
            command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def alive_node_ids(self) -> list[str]:
        listing = subprocess.run(
            [
                sys.executable,
                "-c",
                "import ray; ray.init(address='auto', logging_level='ERROR'); "
                "print(' '.join(n['NodeID'] for n in ray.nodes() if n['Alive']))",
            ],
            env={**self.env, "RAY_ADDRESS": self.address},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert listing.returncode == 0, listing.stderr[-2000:]
        return listing.stdout.strip().splitlines()[-1].split()

    def wait_for_nodes(self, count: int, timeout_s: float = 120) -> None:
        """Until `count` nodes are alive; a node that has just joined gets its Ray node id in `ids`."""
        deadline = time.monotonic() + timeout_s
        while len(alive := self.alive_node_ids()) != count:
            for name, process in self.nodes.items():
                ended = name not in self.lost and process.poll() is not None
                assert not ended, f"node {name} ended:\n{(self.root / f'{name}.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"the cluster did not reach {count} alive nodes"
            time.sleep(1)
        new = [node for node in alive if node not in self.ids.values()]
        unnamed = [name for name in self.nodes if name not in self.ids]
        if len(new) == 1 and len(unnamed) == 1:
            self.ids[unnamed[0]] = new[0]

    def name_of(self, node_id_prefix: str) -> str:
        (name,) = [name for name, node in self.ids.items() if node.startswith(node_id_prefix)]
        return name

    def kill_raylet(self, name: str) -> int:
        """SIGKILL the node's raylet, as a lost machine would end it (its workers end with it); its pid."""
        (raylet,) = [p for p in psutil.Process(self.nodes[name].pid).children(recursive=True) if p.name() == "raylet"]
        raylet.kill()
        self.lost.add(name)
        return raylet.pid

    def stop(self) -> None:
        for process in self.nodes.values():
            try:
                os.killpg(process.pid, signal.SIGTERM)  # `ray start --block` stops the processes it started
            except ProcessLookupError:
                pass
        for process in self.nodes.values():
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
