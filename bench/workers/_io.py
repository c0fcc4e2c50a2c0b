"""The worker calling convention: read the spec JSON, run, write the result JSON."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main(run) -> None:
    """`run(spec) -> dict`; the dict (plus the call's wall seconds) becomes the result file."""
    spec_path, result_path = Path(sys.argv[1]), Path(sys.argv[2])
    spec = json.loads(spec_path.read_text())
    start = time.perf_counter()
    result = run(spec)
    result.setdefault("worker_s", time.perf_counter() - start)
    result_path.write_text(json.dumps(result, indent=1))


def steady(values: list[float], skip: int = 1) -> list[float]:
    """Drop the first `skip` measurements (warm-up) when there are more than that."""
    return values[skip:] if len(values) > skip else list(values)
