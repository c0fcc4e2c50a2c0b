"""Ctrl-C and SIGTERM stop a running stage within seconds, with one line and exit 130/143, and leave its
checkpoints usable; errors raised inside Ray reach the user as the one line they carry."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf_ray import cli

REPO = Path(__file__).resolve().parents[1]


def start_sft(tiny_model_dir: Path, out: Path, log: Path) -> subprocess.Popen:
    command = ["sft", "configs/tiny.yaml", f"model.name_or_path={tiny_model_dir}"]
    return start([*command, f"run.output_dir={out}", "sft.max_steps=400", "resources.num_workers=1"], log)


def start(args: list[str], log: Path) -> subprocess.Popen:
    """`rlhf-ray ARGS` in its own process, output to `log`."""
    return subprocess.Popen(
        [sys.executable, "-m", "rlhf_ray.cli", *args],
        cwd=REPO,
        stdout=log.open("a"),
        stderr=subprocess.STDOUT,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as a terminal's Ctrl-C would find it
    )


def wait_for(log: Path, text: str, process: subprocess.Popen, timeout_s: float = 240) -> None:
    wait_until(lambda: text in log.read_text(), repr(text), process, log, timeout_s)


def wait_until(done, what: str, process: subprocess.Popen, log: Path, timeout_s: float) -> None:
    """Poll `done()` until it holds; fail if the run ends first or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while not done():
        assert process.poll() is None, f"the run ended before {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} within {timeout_s} s"
        time.sleep(0.5)


def stop_with(process: subprocess.Popen, signum: int) -> tuple[int, float]:
    began = time.monotonic()
    process.send_signal(signum)
    try:
        return process.wait(timeout=60), time.monotonic() - began
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"still running 60 s after signal {signum}")


@pytest.mark.ray
def test_ctrl_c_and_sigterm_stop_a_training_stage_in_seconds_and_the_rerun_resumes(tiny_model_dir, tmp_path):
    out, log = tmp_path / "runs", tmp_path / "sft.log"
    run = start_sft(tiny_model_dir, out, log)
    wait_for(log, "Checkpoint successfully created", run)
    code, seconds = stop_with(run, signal.SIGINT)
    said = log.read_text()
    assert code == 130 and seconds < 30, f"exit {code} after {seconds:.0f} s:\n{said[-2000:]}"
    assert "rlhf-ray: interrupted (Ctrl-C); its complete checkpoints are kept, and the same command resumes it" in said

    again = start_sft(tiny_model_dir, out, log)  # `ray job stop` sends SIGTERM
    wait_for(log, "resumed from checkpoint at step", again)
    code, seconds = stop_with(again, signal.SIGTERM)
    said = log.read_text()
    assert code == 143 and seconds < 30, f"exit {code} after {seconds:.0f} s:\n{said[-2000:]}"
    assert "rlhf-ray: stopped by SIGTERM (ray job stop); its complete checkpoints are kept" in said
    assert not (out / "tiny" / "sft" / "model").exists()  # nothing was exported as finished


@pytest.mark.ray
def test_ctrl_c_and_sigterm_stop_ppo_in_seconds_and_resume_continues_from_its_checkpoint(
    tiny_model_dir, tiny_reward_dir, tmp_path
):
    """The four actors and the vLLM engine stop with the driver; the kept checkpoint is what --resume starts from."""
    out, log = tmp_path / "runs", tmp_path / "ppo.log"
    args = ["ppo", "configs/tiny.yaml", f"ppo.policy_model={tiny_model_dir}", f"ppo.reward_model={tiny_reward_dir}"]
    args += [f"run.output_dir={out}", "ppo.iterations=200", "ppo.checkpoint_every=1"]
    run = start(args, log)
    checkpoints = out / "tiny" / "ppo" / "checkpoints"
    wait_until(lambda: any(checkpoints.glob("iter_*/manifest.json")), "a complete checkpoint", run, log, 300)
    code, seconds = stop_with(run, signal.SIGINT)
    said = log.read_text()
    assert code == 130 and seconds < 30, f"exit {code} after {seconds:.0f} s:\n{said[-2000:]}"
    assert "rlhf-ray: interrupted (Ctrl-C); its complete checkpoints are kept, and the same command with --resume" in (
        said
    )

    again = start([*args, "--resume"], log)
    wait_for(log, "[ppo] resumed from", again, timeout_s=300)
    code, seconds = stop_with(again, signal.SIGTERM)
    said = log.read_text()
    assert code == 143 and seconds < 30, f"exit {code} after {seconds:.0f} s:\n{said[-2000:]}"
    assert "rlhf-ray: stopped by SIGTERM (ray job stop); its complete checkpoints are kept" in said
    assert not (out / "tiny" / "ppo" / "model").exists()  # nothing was exported as finished


@pytest.mark.ray
def test_ctrl_c_stops_eval_policy_in_seconds_and_marks_nothing_finished(tiny_model_dir, tiny_reward_dir, tmp_path):
    out, log = tmp_path / "runs", tmp_path / "eval.log"
    args = ["eval", "policy", "configs/tiny.yaml", f"run.output_dir={out}", "--policy", str(tiny_model_dir)]
    args += ["--reward-model", str(tiny_reward_dir)]
    run = start(args, log)
    wait_for(log, "[eval policy] Ray:", run, timeout_s=120)  # its actors and vLLM engine are starting
    time.sleep(2)
    code, seconds = stop_with(run, signal.SIGINT)
    said = log.read_text()
    assert code == 130 and seconds < 30, f"exit {code} after {seconds:.0f} s:\n{said[-2000:]}"
    assert "rlhf-ray: interrupted (Ctrl-C)" in said
    assert not list(out.rglob("eval.json")), "an interrupted eval wrote its result as finished"


@pytest.mark.unit
def test_an_error_raised_inside_ray_is_shown_as_its_one_line(capsys):
    from ray.exceptions import RayTaskError
    from ray.train import WorkerGroupError

    from rlhf_ray.checkpoints import CheckpointError

    try:
        raise ValueError("policy folder /m is a reward model")
    except ValueError as cause:
        remote = RayTaskError("PolicyLearner.__init__", 'Traceback ...\n  File "x.py", line 3, in f', cause)
    wrapped = remote.as_instanceof_cause()  # what ray.get raises: also an instance of ValueError
    assert isinstance(wrapped, ValueError)
    assert cli._report(wrapped) == 2
    assert capsys.readouterr().err == "rlhf-ray: error: policy folder /m is a reward model\n"

    group = WorkerGroupError("Training failed", {0: CheckpointError("/c/x.pt: refused to load")})
    assert cli._report(group) == 2
    assert capsys.readouterr().err == "rlhf-ray: error: /c/x.pt: refused to load\n"


@pytest.mark.unit
def test_an_internal_error_shows_its_traceback_and_says_it_is_a_bug(capsys):
    try:
        raise KeyError("advantages")
    except KeyError as err:
        assert cli._report(err) == 1
    said = capsys.readouterr().err
    assert "Traceback" in said and "KeyError: 'advantages'" in said
    assert said.rstrip().endswith("this is a bug in rlhf-ray, not in your input; please report it with the lines above")
