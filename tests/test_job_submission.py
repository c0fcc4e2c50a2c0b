"""`ray job submit` against a real head node started with `ray start --head`, and its Prometheus metrics."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[1]
RUNTIME_ENV = '{"excludes": [".venv", "runs", ".git", "docs", "*.egg-info", "__pycache__"]}'


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def head_node(tmp_path_factory):
    """The cluster steps of docs/cluster.md on a machine where Ray has never run: its own empty HOME, so the token
    `ray get-auth-token --generate` makes is the only one there is. Dashboard and metrics on 127.0.0.1.

    The steps end with `ray stop`, which stops every Ray on the machine (this suite's own included);
    the fixture starts the head with `--block` and stops exactly that process group instead.
    """
    bin_dir = str(Path(sys.executable).parent)
    home = tmp_path_factory.mktemp("head-home")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}", "HOME": str(home), "RAY_AUTH_MODE": "token"}
    for inherited in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(inherited, None)
    token = subprocess.run(
        [f"{bin_dir}/ray", "get-auth-token", "--generate"], env=env, capture_output=True, text=True, timeout=120
    )
    assert token.returncode == 0 and token.stdout.strip(), token.stderr[-2000:]
    assert (home / ".ray" / "auth_token").read_text().strip() == token.stdout.strip()
    dashboard, metrics = free_port(), free_port()
    temp_dir = f"/tmp/rlhf-ray-head-{dashboard}"  # short (Ray's socket paths) and its own: no address file shared
    log = open(tmp_path_factory.mktemp("head") / "ray-start.log", "w")
    # Every port Ray would otherwise take at a fixed default (GCS 6379, dashboard 8265, job agent 52365,
    # client server 10001) is a free one: the suite's own local Ray may already hold the defaults.
    head = subprocess.Popen(
        [
            f"{bin_dir}/ray",
            "start",
            "--head",
            "--block",
            f"--port={free_port()}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--ray-client-server-port={free_port()}",
            f"--metrics-export-port={metrics}",
            "--num-cpus=2",
            f"--temp-dir={temp_dir}",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    info = {
        "env": env,
        "address": f"http://127.0.0.1:{dashboard}",
        "metrics_port": metrics,
        "bin": bin_dir,
        "temp_dir": temp_dir,
        "log": log.name,
    }
    deadline = time.monotonic() + 120
    while not port_open(dashboard):
        assert head.poll() is None and time.monotonic() < deadline, (
            "ray start --head did not come up:\n" + Path(log.name).read_text()[-3000:] + head_logs(info)
        )
        time.sleep(1)
    yield info
    os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops the processes it started
    head.wait(timeout=120)
    log.close()
    deadline = time.monotonic() + 60
    while port_open(dashboard) and time.monotonic() < deadline:
        time.sleep(1)
    assert not port_open(dashboard), "the head node's dashboard is still running"
    shutil.rmtree(temp_dir, ignore_errors=True)


def ray_job(head, *args, check=True, timeout=600):
    command, rest = args[0], args[1:]
    result = subprocess.run(
        [f"{head['bin']}/ray", "job", command, "--address", head["address"], *rest],
        cwd=REPO,
        env=head["env"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result


def submit(head, *entrypoint):
    """Submit, retrying while the head's job agent is still starting (the dashboard answers before it)."""
    deadline = time.monotonic() + 180
    while True:
        out = ray_job(
            head,
            "submit",
            "--no-wait",
            "--working-dir",
            ".",
            "--runtime-env-json",
            RUNTIME_ENV,
            "--",
            *entrypoint,
            check=False,
        )
        if out.returncode == 0 or "No available agent" not in out.stderr + out.stdout or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:] + head_logs(head)
    return re.search(r"raysubmit_[A-Za-z0-9]+", out.stdout + out.stderr).group(0)


def head_logs(head, names=("dashboard_agent.log", "gcs_server.err", "raylet.err", "ray_process_exit.log")) -> str:
    """The ends of the head node's own logs, so a head that never became ready can be diagnosed."""
    logs = Path(head["temp_dir"]) / "session_latest" / "logs"
    tails = [
        f"\n--- {path.name}\n" + path.read_text(errors="replace")[-1500:] for name in names for path in logs.glob(name)
    ]
    return "".join(tails) or f"\n(no head logs under {logs})"


FINAL = {"succeeded": "SUCCEEDED", "failed": "FAILED", "was stopped": "STOPPED"}


def job_state(head, job_id) -> str | None:
    """The job's final state from `ray job status` (its words, see FINAL), or None while it runs."""
    out = ray_job(head, "status", job_id)
    text = out.stdout + out.stderr
    return next((state for words, state in FINAL.items() if f"Job '{job_id}' {words}" in text), None)


def wait_for_end(head, job_id, timeout=900) -> str:
    deadline = time.monotonic() + timeout
    while (state := job_state(head, job_id)) is None:
        assert time.monotonic() < deadline, f"job {job_id} did not finish"
        time.sleep(3)
    return state


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def test_a_client_without_the_token_is_refused(head_node, tmp_path):
    """Token authentication is really on: the same command from a HOME with no token fails, and says why."""
    env = {**head_node["env"], "HOME": str(tmp_path)}
    refused = subprocess.run(
        [f"{head_node['bin']}/ray", "job", "list", "--address", head_node["address"]],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode != 0
    assert "token" in (refused.stdout + refused.stderr).lower(), refused.stdout[-1000:] + refused.stderr[-1000:]
    assert ray_job(head_node, "list").returncode == 0  # with the token the steps made


def test_ppo_job_succeeds_and_exports_metrics(head_node, tmp_path, tiny_model_dir, tiny_reward_dir):
    job = submit(
        head_node,
        "rlhf-ray",
        "ppo",
        "configs/tiny.yaml",
        "run.name=job",
        f"run.output_dir={tmp_path}",
        f"model.name_or_path={tiny_model_dir}",
        f"ppo.policy_model={tiny_model_dir}",
        f"ppo.reward_model={tiny_reward_dir}",
        "lora.r=8",
        "lora.alpha=16",
        "ppo.iterations=6",
    )
    found = ""
    deadline = time.monotonic() + 600
    while not found and time.monotonic() < deadline:  # the gauges appear while the job runs
        found = "\n".join(
            line
            for line in scrape(head_node["metrics_port"]).splitlines()
            if line.startswith(("ray_rlhf_ray_reward_mean", "ray_rlhf_ray_kl{")) and 'run="job"' in line
        )
        time.sleep(2)
    assert "ray_rlhf_ray_reward_mean" in found and "ray_rlhf_ray_kl{" in found and 'stage="ppo"' in found, found
    assert wait_for_end(head_node, job) == "SUCCEEDED"
    logs = ray_job(head_node, "logs", "--follow", job).stdout
    assert "ppo: 100%" in logs and "[ppo] done" in logs and "Ray: attached to" in logs
    assert (tmp_path / "job" / "ppo" / "model" / "export.json").is_file()


def test_bad_config_job_fails_with_the_error_in_its_log(head_node):
    job = submit(head_node, "rlhf-ray", "ppo", "configs/tiny.yaml", "ppo.kl_coeff=0.1")
    assert wait_for_end(head_node, job, timeout=300) == "FAILED"
    assert "unknown key 'ppo.kl_coeff' (did you mean 'ppo.kl_coef'?)" in ray_job(head_node, "logs", job).stdout


def test_job_stop_ends_the_run_and_its_actors(head_node, tmp_path, tiny_model_dir, tiny_reward_dir):
    """`ray job stop` (SIGTERM to the entrypoint): the job ends STOPPED and the run's PPO actors are gone."""
    job = submit(
        head_node,
        "rlhf-ray",
        "ppo",
        "configs/tiny.yaml",
        "run.name=stopme",
        f"run.output_dir={tmp_path}",
        f"model.name_or_path={tiny_model_dir}",
        f"ppo.policy_model={tiny_model_dir}",
        f"ppo.reward_model={tiny_reward_dir}",
        "lora.r=8",
        "lora.alpha=16",
        "ppo.iterations=500",
    )
    deadline = time.monotonic() + 600
    while "ppo:" not in ray_job(head_node, "logs", job).stdout:  # the actors are up and iterating
        assert time.monotonic() < deadline, "the PPO job never started iterating"
        assert job_state(head_node, job) is None, ray_job(head_node, "logs", job).stdout[-3000:]
        time.sleep(3)
    ray_job(head_node, "stop", job)
    assert wait_for_end(head_node, job, timeout=300) == "STOPPED"
    deadline = time.monotonic() + 120
    while (alive := alive_actors(head_node, "rlhf-ray-stopme")) and time.monotonic() < deadline:
        time.sleep(3)
    assert not alive, f"actors of the stopped run still alive: {alive}"


def alive_actors(head, namespace: str) -> list[str]:
    """Names of the ALIVE actors in one Ray namespace, from the head's state API (`ray list actors`)."""
    out = subprocess.run(
        [
            f"{head['bin']}/ray",
            "list",
            "actors",
            "--address",
            head["address"],
            "--format",
            "json",
            "--detail",
            "--limit",
            "1000",
        ],
        env=head["env"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return [
        actor.get("name") or actor["class_name"]
        for actor in json.loads(out.stdout)
        if actor.get("ray_namespace") == namespace and actor["state"] == "ALIVE"
    ]
