"""How `rlhf-ray sweep` lists its trials and picks the best one by held-out quality (pure functions, no Ray)."""

from rlhf_ray.sweep import best_trial, heldout_row


def row(kl_coef, gain, kl, error=""):
    return {
        "kl_coef": kl_coef,
        "lr": 1e-4,
        "heldout_gain": gain,
        "heldout_kl": kl,
        "heldout_win_rate": 0.5,
        "error": error,
    }


def test_the_largest_gain_within_the_kl_budget_wins():
    rows = [row(0.01, 2.0, 9.0), row(0.05, 0.8, 4.0), row(0.1, 0.3, 1.0)]
    assert best_trial(rows, kl_budget=5.0)["kl_coef"] == 0.05  # 2.0 is larger but its KL is over budget
    assert best_trial(rows, kl_budget=10.0)["kl_coef"] == 0.01


def test_over_budget_everywhere_picks_the_smallest_kl():
    rows = [row(0.01, 2.0, 9.0), row(0.05, 0.8, 6.0)]
    assert best_trial(rows, kl_budget=5.0)["kl_coef"] == 0.05


def test_trials_without_a_heldout_result_are_never_picked():
    rows = [row(0.01, None, None), row(0.05, 9.0, 0.1, error="RayTaskError: boom"), row(0.1, -0.2, 0.5)]
    assert best_trial(rows, kl_budget=5.0)["kl_coef"] == 0.1
    assert best_trial(rows[:2], kl_budget=5.0) is None


def test_heldout_row_reads_the_ppo_policy_of_an_eval_policy_result():
    results = {
        "policies": {
            "start": {
                "kl_to_first": 0.0,
                "reward": {"rm": {"gain_in_first_std": 0.0, "win_rate_vs_first": {"rate": 0.5}}},
            },
            "ppo": {
                "kl_to_first": 1.25,
                "reward": {"rm": {"gain_in_first_std": 0.7, "win_rate_vs_first": {"rate": 0.64}}},
            },
        }
    }
    assert heldout_row(results) == {"heldout_gain": 0.7, "heldout_kl": 1.25, "heldout_win_rate": 0.64}


RULE_REWARD = "ppo.rewards=[{kind: function, function: 'my_reward.py:score'}]"


def test_a_sweep_of_a_run_without_a_reward_model_must_rank_by_a_training_metric():
    import pytest

    from rlhf_ray.config import load_config
    from rlhf_ray.sweep import run_sweep

    with pytest.raises(ValueError, match="rank_by=heldout judges trials with the run's reward model.*rank_by=metric"):
        run_sweep(load_config("configs/sweep.yaml", [RULE_REWARD]))


def test_trials_get_reward_functions_from_files_by_absolute_path(tmp_path, monkeypatch):
    from rlhf_ray.config import load_config
    from rlhf_ray.sweep import with_absolute_paths

    (tmp_path / "my_reward.py").write_text("def score(prompt, response, fields):\n    return 1.0\n")
    monkeypatch.chdir(tmp_path)
    config = with_absolute_paths(
        load_config(None, [RULE_REWARD, "ppo.advantage_estimator=rloo", "ppo.responses_per_prompt=2"])
    )
    assert config.ppo.rewards[0].function == f"{tmp_path / 'my_reward.py'}:score"


def test_the_trials_are_listed_before_tune_starts_and_the_same_config_lists_the_same_trials():
    from rlhf_ray.config import SweepConfig
    from rlhf_ray.sweep import trial_specs

    grid = trial_specs(SweepConfig(kl_coefs=[0.01, 0.1], lrs=[1e-4], num_samples=2), seed=0)
    assert [(t["name"], t["kl_coef"], t["lr"]) for t in grid] == [
        ("t00-kl0.01-lr0.0001", 0.01, 1e-4),
        ("t01-kl0.1-lr0.0001", 0.1, 1e-4),
        ("t02-kl0.01-lr0.0001", 0.01, 1e-4),
        ("t03-kl0.1-lr0.0001", 0.1, 1e-4),
    ]
    random_search = SweepConfig(search="random", kl_coefs=[0.01, 0.02, 0.05], lrs=[1e-5, 1e-4, 1e-3], num_samples=5)
    drawn = trial_specs(random_search, seed=3)
    assert drawn == trial_specs(random_search, seed=3)  # a resumed sweep finds its trials' run folders again
    assert len({t["name"] for t in drawn}) == 5
    assert all(t["kl_coef"] in random_search.kl_coefs and t["lr"] in random_search.lrs for t in drawn)
    assert trial_specs(random_search, seed=4) != drawn
