import pytest

from rlhf_ray.run_log import MetricsLog, plot_curves, read_metrics

pytestmark = pytest.mark.unit


def test_resume_drops_lines_after_the_checkpoint_and_plots(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=False)
    for step in range(1, 5):
        log.log(step, {"loss": 1.0 / step, "lr": 2.5e-7 * step})
    assert [row["step"] for row in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    assert read_metrics(tmp_path / "metrics.jsonl")[0]["lr"] == 2.5e-7  # small values keep their digits

    resumed = MetricsLog(tmp_path, resume_step=2, tensorboard=True)
    resumed.log(3, {"loss": 0.3})
    resumed.close()
    assert [row["step"] for row in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    assert any((tmp_path / "tensorboard").iterdir())

    png = plot_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png", "test")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_curves(tmp_path / "missing.jsonl", tmp_path / "none.png", "empty") is None


def test_a_start_from_step_0_logs_afresh_over_an_interrupted_run_that_saved_no_checkpoint(tmp_path):
    interrupted = MetricsLog(tmp_path, tensorboard=False)
    interrupted.log(0, {"eval_loss": 2.0})  # the untrained eval
    interrupted.log(1, {"loss": 1.5})
    restarted = MetricsLog(tmp_path, resume_step=0, tensorboard=False)
    restarted.log(0, {"eval_loss": 2.0})
    assert [row["step"] for row in read_metrics(tmp_path / "metrics.jsonl")] == [0]
