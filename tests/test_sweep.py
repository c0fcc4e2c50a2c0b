"""`rlhf-ray sweep`: Ray Tune PPO trials over 2 KL coefficients x 2 learning rates, interrupted (Ctrl-C) and
restored."""

import csv
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest

from rlhf_ray.config import load_config
from rlhf_ray.sweep import best_trial
from tests.faults import RunsAShellCommand

pytestmark = pytest.mark.e2e


def finished_trials(experiment) -> list:
    """Trial folders whose result.json holds the held-out result reported after the final (2nd) iteration."""
    done = []
    for result in experiment.glob("run_trial_*/result.json"):
        rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        if rows and "heldout_gain" in rows[-1]:
            done.append(result.parent)
    return done


def run_folder(tmp_path, trial):
    """The PPO run folder of a Tune trial: named by the trial's place and values in the sweep's list."""
    return tmp_path / f"sw-{json.loads((trial / 'params.json').read_text())['trial']['name']}"


def written_at(folder) -> tuple:
    return tuple((folder / name).stat().st_mtime_ns for name in ("ppo/metrics.jsonl", "eval/heldout/eval.json"))


def test_sweep_interrupted_then_restored(ray_local, tmp_path, tiny_model_dir, tiny_reward_dir):
    import ray

    command = [
        sys.executable,
        "-m",
        "rlhf_ray.cli",
        "sweep",
        "configs/tiny.yaml",
        f"run.output_dir={tmp_path}",
        "run.name=sw",
        f"model.name_or_path={tiny_model_dir}",
        f"ppo.policy_model={tiny_model_dir}",
        f"ppo.reward_model={tiny_reward_dir}",
        "lora.r=8",
        "lora.alpha=16",
        "ppo.iterations=2",
        "sweep.kl_coefs=[0.01, 0.1]",
        "sweep.lrs=[1.0e-4, 1.0e-3]",
        "resources.actor_num_cpus=0.4",
    ]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    experiment = tmp_path / "sw" / "sweep"
    log = tmp_path / "sweep.log"
    sweep = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    deadline = time.monotonic() + 600
    while not finished_trials(experiment):
        assert sweep.poll() is None, "the sweep ended before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(1)
    first = [run_folder(tmp_path, trial) for trial in finished_trials(experiment)]
    written = {folder: written_at(folder) for folder in first}
    began = time.monotonic()
    sweep.send_signal(signal.SIGINT)  # Ctrl-C: the trials' actors end with the driver
    sweep.wait(timeout=60)
    said = log.read_text()
    assert sweep.returncode == 130 and time.monotonic() - began < 30, said[-2000:]
    assert "rlhf-ray: interrupted (Ctrl-C); its complete checkpoints are kept, and the same command with --resume" in (
        said
    )
    assert not (tmp_path / "sw" / "sweep_results.csv").exists()
    marker = tmp_path / "the-pickle-ran"
    (experiment / "tuner.pkl").write_bytes(pickle.dumps(RunsAShellCommand(f"touch {marker}")))  # Tune.restore runs it

    restored = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True, timeout=900)
    assert restored.returncode == 0, restored.stdout[-2000:] + restored.stderr[-2000:]
    assert "[sweep] resuming" in restored.stdout

    with open(tmp_path / "sw" / "sweep_results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted((float(r["kl_coef"]), float(r["lr"])) for r in rows) == [
        (0.01, 1e-4),
        (0.01, 1e-3),
        (0.1, 1e-4),
        (0.1, 1e-3),
    ]
    assert all(r["iterations"] == "2" and r["error"] == "" and r["reward_mean"] for r in rows), rows
    for folder in first:  # a trial finished before the interruption was not trained or evaluated again
        assert written_at(folder) == written[folder], folder
        assert len((folder / "ppo" / "metrics.jsonl").read_text().splitlines()) == 2
    assert not marker.exists(), "the resume unpickled Tune's experiment state"
    # every trial was evaluated on the eval split; the best config is the best held-out gain within the KL budget
    assert all(r["heldout_gain"] and r["heldout_kl"] and r["heldout_win_rate"] for r in rows), rows
    reports = sorted(tmp_path.glob("sw-*/eval/heldout/eval.json"))
    assert len(reports) == 4
    assert all("in the 'eval' split" in json.loads(p.read_text())["prompts"] for p in reports), reports[0].read_text()[
        :500
    ]
    numeric = [
        {**r, **{k: float(r[k]) for k in ("kl_coef", "lr", "heldout_gain", "heldout_kl", "heldout_win_rate")}}
        for r in rows
    ]
    expected = best_trial(numeric, kl_budget=5.0)
    best = load_config(tmp_path / "sw" / "best_config.yaml")
    assert (best.ppo.kl_coef, best.ppo.lr) == (expected["kl_coef"], expected["lr"])
    assert "[sweep] best by held-out gain" in restored.stdout
    assert (tmp_path / "sw" / "sweep.png").is_file()
