"""Metrics of a run: JSON lines, TensorBoard, and a PNG of the curves."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    """Appends one JSON object per step to metrics.jsonl and mirrors scalars to TensorBoard.

    On resume from step N, lines logged after N by the interrupted run are dropped first,
    so the file holds each step once; a start from step 0 (no checkpoint to resume) logs afresh.
    """

    def __init__(self, folder: str | Path, resume_step: int = 0, tensorboard: bool = True):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / "metrics.jsonl"
        if resume_step:
            trim_jsonl(self.path, "step", resume_step)
        else:  # an interrupted run that saved no checkpoint: its step-0 lines are logged again
            self.path.unlink(missing_ok=True)
        self._writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(
                str(self.folder / "tensorboard"), purge_step=resume_step + 1 if resume_step else None
            )

    def log(self, step: int, metrics: dict) -> None:
        row = {"step": step, **{k: (float(f"{v:.7g}") if isinstance(v, float) else v) for k, v in metrics.items()}}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        if self._writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def trim_jsonl(path: str | Path, key: str, keep_up_to: int) -> None:
    """Keep only the rows whose `key` is <= keep_up_to (an interrupted run's later rows go)."""
    path = Path(path)
    if not path.exists():
        return
    kept = [row for row in read_metrics(path) if row.get(key, 0) <= keep_up_to]
    path.write_text("".join(json.dumps(row) + "\n" for row in kept))


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(
    metrics_path: str | Path, out_png: str | Path, title: str, keys: list[str] | None = None
) -> Path | None:
    """One panel per numeric metric (or per name in `keys` that was logged) over steps; None when nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    logged = {k for row in rows for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
    keys = [k for k in keys if k in logged] if keys else sorted(logged)
    if not keys:
        return None
    cols = min(3, len(keys))
    rows_n = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.5 * cols, 3.2 * rows_n), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        points = [(row["step"], row[key]) for row in rows if isinstance(row.get(key), (int, float))]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o" if len(points) < 30 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return Path(out_png)
