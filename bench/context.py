"""What every suite needs: where to work, how big, how often, and the A/B loop that alternates systems."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import Progress, RunRecord, fmt_duration, run_worker


@dataclass
class System:
    """One side of an A/B pair: a worker module, how to build its spec for a repeat, and its extra environment."""

    name: str
    module: str
    spec: Callable[[int], dict]
    env: dict = field(default_factory=dict)


@dataclass
class Context:
    work: Path  # scratch folder outside the repo: prepared data, run outputs, specs
    quick: bool
    repeats: dict[str, int]  # per suite
    progress: Progress
    model_dir: str = ""
    peak: dict[str, float] = field(default_factory=dict)  # matmul FLOP/s per dtype, from the ceiling suite
    trl_version: str = ""

    def run(self, suite: str, system: System, repeat: int, timeout_s: float = 3600.0) -> RunRecord:
        kind = f"{suite}:{system.name}"
        self.progress.begin(kind, f"{suite} / {system.name} (repeat {repeat + 1})")
        record = run_worker(
            suite, system.name, repeat, system.module, system.spec(repeat), self.work, system.env, timeout_s
        )
        self.progress.end(kind, record.process_s)
        status = "ok" if record.ok else "FAILED"
        print(f"[bench]   -> {status} in {fmt_duration(record.process_s)} (log {record.log})", flush=True)
        if not record.ok:
            print(record.error, flush=True)
        return record

    def alternate(self, suite: str, systems: list[System]) -> list[RunRecord]:
        """Each system once per repeat, in turn (A, B, A, B, ...), every run a fresh process."""
        return [self.run(suite, system, repeat) for repeat in range(self.repeats[suite]) for system in systems]

    def prep(self, suite: str, spec: dict) -> dict:
        """Run the shared-input preparation (rlhf-ray's tokenization) once; its summary, or an error."""
        record = self.run(suite, System("prep", "bench.workers.prep", lambda _: spec), 0)
        if not record.ok:
            raise RuntimeError(f"{suite}: preparing the shared inputs failed:\n{record.error}")
        return record.result
