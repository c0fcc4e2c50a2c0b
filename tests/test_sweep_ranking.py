"""How `rlhf-ray sweep` picks its best trial by held-out quality (pure functions, no Ray)."""

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
