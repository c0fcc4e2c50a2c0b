import json

import pytest

from rlhf_ray.pipeline import summary_table

pytestmark = pytest.mark.unit


def test_summary_table_reports_each_stage(tmp_path):
    rows = {
        "sft": [{"step": 30, "loss": 2.0, "eval_loss": 1.9, "eval_perplexity": 6.7}],
        "rm": [{"step": 10, "eval_accuracy": 0.5}, {"step": 20, "eval_accuracy": 0.9, "eval_margin": 2.5}],
        "ppo": [{"step": 1, "reward_mean": 0.1, "kl": 0.0}, {"step": 2, "reward_mean": 0.4, "kl": 0.3}],
    }
    for stage, lines in rows.items():
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    table = summary_table(tmp_path, {"sft": 120.0, "ppo": 30.0})
    assert "sft | 30 | eval loss 1.9, perplexity 6.7 | 2.0 min" in table
    assert "rm | 20 | eval accuracy 0.9, margin 2.5 | -" in table
    assert "ppo | 2 | reward 0.1 -> 0.4, KL 0 -> 0.3 | 0.5 min" in table
    assert f"ppo: model {tmp_path / 'ppo' / 'model'}" in table


@pytest.mark.ray
def test_tiny_pipeline_ends_with_the_eval_stage(ray_local, tmp_path, tiny_model_dir, capsys):
    """SFT -> RM -> PPO -> eval on the tiny model: the summary has the eval row, the eval compares the
    starting policy with the PPO policy on test prompts only, and a rerun skips every finished stage."""
    from rlhf_ray.config import load_config
    from rlhf_ray.formats.load import load_prompts
    from rlhf_ray.formats.splits import select
    from rlhf_ray.pipeline import run_pipeline

    config = load_config(
        "configs/tiny.yaml",
        [
            f"model.name_or_path={tiny_model_dir}",
            f"run.output_dir={tmp_path}",
            "run.name=pipe",
            "eval.prompts_limit=4",
            "resources.num_workers=1",
            "deepspeed.zero_stage=0",
        ],
    )
    run_pipeline(config)
    out = capsys.readouterr().out
    eval_rows = [line for line in out.splitlines() if line.startswith("eval | ")]
    assert len(eval_rows) == 1 and "win-rate" in eval_rows[0] and "KL" in eval_rows[0], out[-3000:]
    results = json.loads((tmp_path / "pipe" / "eval" / "policy" / "eval.json").read_text())
    assert list(results["policies"]) == ["start", "ppo"] and results["policies"]["ppo"]["samples"] == 4
    test_prompts = select(
        load_prompts("data/demo/prompts.jsonl").examples, "test", seed=0, eval_fraction=0.1, test_fraction=0.1
    )
    assert f"{len(test_prompts)} of 200 prompts in the 'test' split" in results["prompts"]
    for stage in ("sft", "rm"):
        first = json.loads((tmp_path / "pipe" / stage / "metrics.jsonl").read_text().splitlines()[0])
        assert first["step"] == 0 and "eval_loss" in first  # the curves start from the untrained model
    run_pipeline(config)
    again = capsys.readouterr().out
    assert "eval: finished output exists" in again and again.count("skipping") == 4
