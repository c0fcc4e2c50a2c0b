import json

import pytest

from rlhf_ray.pipeline import summary_table

pytestmark = pytest.mark.unit


def test_summary_table_reports_each_stage(tmp_path):
    rows = {"sft": [{"step": 30, "loss": 2.0, "eval_loss": 1.9, "eval_perplexity": 6.7}],
            "rm": [{"step": 10, "eval_accuracy": 0.5}, {"step": 20, "eval_accuracy": 0.9, "eval_margin": 2.5}],
            "ppo": [{"step": 1, "reward_mean": 0.1, "kl": 0.0}, {"step": 2, "reward_mean": 0.4, "kl": 0.3}]}
    for stage, lines in rows.items():
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    table = summary_table(tmp_path, {"sft": 120.0, "ppo": 30.0})
    assert "sft | 30 | eval loss 1.9, perplexity 6.7 | 2.0 min" in table
    assert "rm | 20 | eval accuracy 0.9, margin 2.5 | -" in table
    assert "ppo | 2 | reward 0.1 -> 0.4, KL 0 -> 0.3 | 0.5 min" in table
    assert f"ppo: model {tmp_path / 'ppo' / 'model'}" in table
