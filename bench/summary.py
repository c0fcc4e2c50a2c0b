"""From run records to table rows (median, min, max per system; rlhf-ray vs each peer) and target checks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bench.common import RunRecord, summarize


@dataclass
class Metric:
    key: str
    label: str
    unit: str
    higher_better: bool
    value: Callable[[RunRecord], float | None]  # one run's figure
    compare: bool = True  # False for context figures (e.g. tokens per iteration): no "better" column


def wall_time_metrics(call: str) -> list[Metric]:
    """The call's wall seconds (`call` says what it spans) and the whole process's, imports included."""
    return [
        Metric("call_s", f"wall s of the call ({call})", "s", False, safe(lambda r: r.result["call_s"])),
        Metric("process_s", "wall s of the whole process", "s", False, safe(lambda r: r.process_s)),
    ]


def advantage(ours: float | None, theirs: float | None, higher_better: bool) -> float | None:
    """How many times better rlhf-ray is: ours/theirs for rates, theirs/ours for durations (>1 = rlhf-ray better)."""
    if not ours or not theirs:
        return None
    return ours / theirs if higher_better else theirs / ours


def safe(fn: Callable[[RunRecord], float | None]) -> Callable[[RunRecord], float | None]:
    """A metric reader that gives None for failed runs and missing keys instead of raising."""

    def read(record: RunRecord) -> float | None:
        if not record.ok:
            return None
        try:
            value = fn(record)
        except (KeyError, TypeError, IndexError, ZeroDivisionError):
            return None
        return float(value) if isinstance(value, (int, float)) else None

    return read


def table(runs: list[RunRecord], systems: list[str], metrics: list[Metric]) -> list[dict]:
    """One row per metric: the summary of each system's runs and rlhf-ray's advantage over each other system."""
    rows = []
    for metric in metrics:
        per_system = {}
        for name in systems:
            mine = [r for r in runs if r.system == name]
            per_system[name] = {**summarize([metric.value(r) for r in mine]), "failed": sum(not r.ok for r in mine)}
        ours = per_system[systems[0]]["median"]
        rows.append(
            {
                "key": metric.key,
                "label": metric.label,
                "unit": metric.unit,
                "higher_better": metric.higher_better,
                "compare": metric.compare,
                "values": per_system,
                "advantage": {
                    peer: advantage(ours, per_system[peer]["median"], metric.higher_better) if metric.compare else None
                    for peer in systems[1:]
                },
            }
        )
    return rows


def row(rows: list[dict], key: str) -> dict:
    return next(r for r in rows if r["key"] == key)


def target(name: str, measured: float | None, threshold: float, unit: str = "x") -> dict:
    """A target check; a missing figure counts as not met."""
    return {
        "name": name,
        "measured": measured,
        "threshold": threshold,
        "unit": unit,
        "met": measured is not None and measured >= threshold,
    }
