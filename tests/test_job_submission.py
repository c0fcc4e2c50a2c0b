"""`ray job submit` against a real head node started with `ray start --head`, and its Prometheus metrics."""

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
    """A real head node (dashboard and metrics on 127.0.0.1), stopped after the tests; nothing left running."""
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    dashboard, metrics = free_port(), free_port()
    temp_dir = f"/tmp/rlhf-ray-head-{dashboard}"  # its own address file, so later ray.init calls never find it
    log = open(tmp_path_factory.mktemp("head") / "ray-start.log", "w")
    head = subprocess.Popen(
        [f"{bin_dir}/ray", "start", "--head", "--block", f"--port={free_port()}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", f"--metrics-export-port={metrics}", "--num-cpus=2", f"--temp-dir={temp_dir}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while not port_open(dashboard):
        assert head.poll() is None and time.monotonic() < deadline, "ray start --head did not come up"
        time.sleep(1)
    yield {"env": env, "address": f"http://127.0.0.1:{dashboard}", "metrics_port": metrics, "bin": bin_dir,
           "temp_dir": temp_dir}
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
    result = subprocess.run([f"{head['bin']}/ray", "job", command, "--address", head["address"], *rest], cwd=REPO,
                            env=head["env"], capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result


def submit(head, *entrypoint):
    """Submit, retrying while the head's job agent is still starting (the dashboard answers before it)."""
    deadline = time.monotonic() + 180
    while True:
        out = ray_job(head, "submit", "--no-wait", "--working-dir", ".", "--runtime-env-json", RUNTIME_ENV, "--",
                      *entrypoint, check=False)
        if out.returncode == 0 or "No available agent" not in out.stderr + out.stdout or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:] + head_logs(head)
    return re.search(r"raysubmit_[A-Za-z0-9]+", out.stdout + out.stderr).group(0)


def head_logs(head, names=("dashboard_agent.log", "gcs_server.err", "raylet.err", "ray_process_exit.log")) -> str:
    """The ends of the head node's own logs, so a head that never became ready can be diagnosed."""
    logs = Path(head["temp_dir"]) / "session_latest" / "logs"
    tails = [f"\n--- {path.name}\n" + path.read_text(errors="replace")[-1500:]
             for name in names for path in logs.glob(name)]
    return "".join(tails) or f"\n(no head logs under {logs})"


FINAL = {"succeeded": "SUCCEEDED", "failed": "FAILED", "was stopped": "STOPPED"}


def wait_for_end(head, job_id, timeout=900) -> str:
    """Poll `ray job status` until it reports one of the final states (its words, see FINAL)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = ray_job(head, "status", job_id)
        text = out.stdout + out.stderr
        for words, state in FINAL.items():
            if f"Job '{job_id}' {words}" in text:
                return state
        time.sleep(3)
    raise AssertionError(f"job {job_id} did not finish")


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def test_ppo_job_succeeds_and_exports_metrics(head_node, tmp_path, tiny_model_dir, tiny_reward_dir):
    job = submit(head_node, "rlhf-ray", "ppo", "configs/tiny.yaml", "run.name=job", f"run.output_dir={tmp_path}",
                 f"model.name_or_path={tiny_model_dir}", f"ppo.policy_model={tiny_model_dir}",
                 f"ppo.reward_model={tiny_reward_dir}", "lora.r=8", "lora.alpha=16", "ppo.iterations=6")
    found = ""
    deadline = time.monotonic() + 600
    while not found and time.monotonic() < deadline:  # the gauges appear while the job runs
        found = "\n".join(line for line in scrape(head_node["metrics_port"]).splitlines()
                          if line.startswith(("ray_rlhf_ray_reward_mean", "ray_rlhf_ray_kl{")) and 'run="job"' in line)
        time.sleep(2)
    assert "ray_rlhf_ray_reward_mean" in found and "ray_rlhf_ray_kl{" in found and 'stage="ppo"' in found, found
    assert wait_for_end(head_node, job) == "SUCCEEDED"
    logs = ray_job(head_node, "logs", job).stdout
    assert "ppo: 100%" in logs and "[ppo] done" in logs and "Ray: attached to" in logs
    assert (tmp_path / "job" / "ppo" / "model" / "export.json").is_file()


def test_bad_config_job_fails_with_the_error_in_its_log(head_node):
    job = submit(head_node, "rlhf-ray", "ppo", "configs/tiny.yaml", "ppo.kl_coeff=0.1")
    assert wait_for_end(head_node, job, timeout=300) == "FAILED"
    assert "unknown key 'ppo.kl_coeff' (did you mean 'ppo.kl_coef'?)" in ray_job(head_node, "logs", job).stdout
