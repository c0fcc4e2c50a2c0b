"""Shared plumbing: paths, one workload in a fresh subprocess, summary statistics, progress."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
OUT = BENCH / "out"  # gitignored: logs and smoke-run results
SHARED_DATA = Path(os.environ.get("RLHF_RAY_SHARED_DATA", REPO.parent / "shared" / "data"))
PYTHON = sys.executable


def rel(path: str | Path) -> str:
    """A path as the repo sees it (../shared/data/... for the real data), for printing and configs."""
    path = Path(path).resolve()
    try:
        return os.path.relpath(path, REPO)
    except ValueError:
        return str(path)


@dataclass
class RunRecord:
    """One workload run in its own process: what ran, how long the process took, what it reported."""

    suite: str
    system: str
    repeat: int
    command: str
    spec: dict = field(default_factory=dict)  # exactly what the worker was asked to run
    ok: bool = False
    error: str = ""
    process_s: float = 0.0  # wall seconds of the whole subprocess, imports included
    load_before: float = 0.0  # 1-minute load average when the run started (other work on the machine skews figures)
    result: dict = field(default_factory=dict)
    log: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def run_worker(
    suite: str,
    system: str,
    repeat: int,
    module: str,
    spec: dict,
    work: Path,
    env: dict | None = None,
    timeout_s: float = 3600.0,
) -> RunRecord:
    """Run `python -m module spec.json result.json` in a fresh process; its output goes to a log file."""
    tag = f"{suite}-{system}-{repeat}"
    spec_path, result_path = work / "specs" / f"{tag}.json", work / "specs" / f"{tag}.result.json"
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(spec, indent=1))
    result_path.unlink(missing_ok=True)
    log = OUT / "logs" / f"{tag}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    argv = [PYTHON, "-m", module, str(spec_path), str(result_path)]
    record = RunRecord(
        suite,
        system,
        repeat,
        " ".join([rel(PYTHON), "-m", module, "<spec>", "<result>"]),
        spec=spec,
        log=rel(log),
        load_before=os.getloadavg()[0],
    )
    start = time.perf_counter()
    with open(log, "w") as handle:  # own session: on a timeout the worker and whatever it started (Ray) go together
        proc = subprocess.Popen(
            argv,
            cwd=REPO,
            env=worker_env(env),
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            code = proc.wait(timeout=timeout_s)
            record.ok = code == 0 and result_path.is_file()
            if not record.ok:
                record.error = f"exit code {code}; last lines of {rel(log)}:\n" + tail(log)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            record.error = f"timed out after {timeout_s:.0f} s; last lines of {rel(log)}:\n" + tail(log)
    record.process_s = time.perf_counter() - start
    if result_path.is_file():
        record.result = json.loads(result_path.read_text())
    return record


def worker_env(extra: dict | None) -> dict:
    """The parent's environment without PYTHONPATH (TRL only enters where `extra` puts it back)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def summarize(values: list) -> dict:
    """Median, min and max of the numbers in `values` (None where a run gave nothing)."""
    numbers = [float(v) for v in values if isinstance(v, (int, float))]
    if not numbers:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(numbers), "min": min(numbers), "max": max(numbers), "n": len(numbers)}


def median_or_none(values: list) -> float | None:
    return summarize(values)["median"]


def fmt_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """Prints where the benchmark is and how long it should still take, from estimates refined by measured runs."""

    def __init__(self, planned: list[tuple[str, float]]):
        self.planned = list(planned)  # (kind, estimated seconds) of every run still to do, in order
        self.start = time.perf_counter()
        self.measured: dict[str, list[float]] = {}

    def _estimate(self, kind: str, default: float) -> float:
        seen = self.measured.get(kind)
        return statistics.median(seen) if seen else default

    def begin(self, kind: str, label: str) -> None:
        remaining = sum(self._estimate(k, s) for k, s in self.planned)
        done = sum(len(v) for v in self.measured.values())
        print(
            f"[bench] {label}: run {done + 1} of {done + len(self.planned)}; elapsed "
            f"{fmt_duration(time.perf_counter() - self.start)}, about {fmt_duration(remaining)} to go",
            flush=True,
        )

    def end(self, kind: str, seconds: float) -> None:
        for i, (k, _) in enumerate(self.planned):
            if k == kind:
                del self.planned[i]
                break
        self.measured.setdefault(kind, []).append(seconds)
