"""PPO math checked against numbers derived by hand (in the comments), not against a second implementation."""

import math
import subprocess
import sys

import pytest
import torch

from rlhf_ray.algo.ppo import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    explained_variance,
    gae_advantages,
    kl_penalty,
    logprobs_from_logits,
    policy_loss,
    token_rewards,
    value_loss,
    whiten,
)

pytestmark = pytest.mark.unit

LOG2 = math.log(2.0)


def close(actual: torch.Tensor, expected, tol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=tol, atol=tol)


# ---- KL estimators -------------------------------------------------------------------------


def test_kl_estimators_on_known_probabilities():
    # policy p = 0.5, reference q = 0.25 at the sampled token: log(p/q) = log 2
    logp, ref = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]])
    close(kl_penalty(logp, ref, "k1"), [[LOG2]])  # k1 = log p - log q = log 2
    close(kl_penalty(logp, ref, "k2"), [[0.5 * LOG2**2]])  # k2 = (log 2)^2 / 2 = 0.2402
    # k3: r = log(q/p) = -log 2; e^r - 1 - r = 0.5 - 1 + log 2 = 0.1931
    close(kl_penalty(logp, ref, "k3"), [[LOG2 - 0.5]])
    assert kl_penalty(logp, ref).item() == pytest.approx(LOG2)  # default is k1


def test_kl_estimators_signs_and_zero():
    # p = 0.25, q = 0.5: k1 = -log 2 (negative), k2 = (log 2)^2/2, k3 = e^{log 2} - 1 - log 2 = 1 - log 2
    logp, ref = torch.tensor([math.log(0.25)]), torch.tensor([math.log(0.5)])
    close(kl_penalty(logp, ref, "k1"), [-LOG2])
    close(kl_penalty(logp, ref, "k2"), [0.5 * LOG2**2])
    close(kl_penalty(logp, ref, "k3"), [1 - LOG2])
    same = torch.tensor([[-1.3, -0.2]])
    for estimator in ("k1", "k2", "k3"):
        assert kl_penalty(same, same, estimator).abs().max().item() == 0.0


def test_unknown_kl_estimator_is_an_error():
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), "k4")


# ---- per-token rewards ---------------------------------------------------------------------


def test_token_rewards_put_score_on_last_real_token():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-1.0, -3.0, -0.5], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    scores = torch.tensor([3.0, -1.0, 7.0])
    rewards, kl = token_rewards(scores, logprobs, ref, mask, kl_coef=0.1)
    # k1 = logprobs - ref: row 0 [0.5, 0, -1 -> padding 0]; row 1 [0, 2, -0.5]; row 2 all padding
    close(kl, [[0.5, 0.0, 0.0], [0.0, 2.0, -0.5], [0.0, 0.0, 0.0]])
    # -0.1 * kl, plus the score at the last real token (index 1 for row 0, 2 for row 1, none for row 2)
    close(rewards, [[-0.05, 3.0, 0.0], [0.0, -0.2, 0.05 - 1.0], [0.0, 0.0, 0.0]])


def test_token_rewards_with_k3_and_zero_coef():
    logprobs = torch.tensor([[math.log(0.5), math.log(0.5)]])
    ref = torch.tensor([[math.log(0.25), math.log(0.5)]])
    rewards, kl = token_rewards(torch.tensor([2.0]), logprobs, ref, torch.ones(1, 2), kl_coef=0.0, estimator="k3")
    close(kl, [[LOG2 - 0.5, 0.0]])
    close(rewards, [[0.0, 2.0]])  # no KL penalty: only the score at the end


# ---- GAE -----------------------------------------------------------------------------------


def test_gae_one_row_by_hand():
    # gamma = 0.9, lam = 0.8, gamma * lam = 0.72; rewards [1, 0, 2], values [1, 2, 1]
    # t=2: delta = 2 + 0.9 * 0 (episode ends) - 1 = 1            A2 = 1
    # t=1: delta = 0 + 0.9 * 1 - 2 = -1.1                         A1 = -1.1 + 0.72 * 1 = -0.38
    # t=0: delta = 1 + 0.9 * 2 - 1 = 1.8                          A0 = 1.8 + 0.72 * -0.38 = 1.5264
    # returns = A + V = [2.5264, 1.62, 2]
    rewards, values = torch.tensor([[1.0, 0.0, 2.0]]), torch.tensor([[1.0, 2.0, 1.0]])
    advantages, returns = gae_advantages(rewards, values, torch.ones(1, 3), gamma=0.9, lam=0.8)
    close(advantages, [[1.5264, -0.38, 1.0]])
    close(returns, [[2.5264, 1.62, 2.0]])


def test_gae_padding_gets_zero_and_last_real_token_bootstraps_from_zero():
    # mask [1, 1, 0]; the padding position holds garbage (reward 5, value 7) that must not leak in.
    # t=1 (last real): delta = 2 + 0.9 * 0 - 1 = 1                A1 = 1   (a leak would use 0.9 * 7)
    # t=0: delta = 1 + 0.9 * 1 - 0.5 = 1.4                        A0 = 1.4 + 0.72 * 1 = 2.12
    # returns = [2.12 + 0.5, 1 + 1, 0] = [2.62, 2, 0]
    rewards = torch.tensor([[1.0, 2.0, 5.0], [1.0, 0.0, 2.0]])
    values = torch.tensor([[0.5, 1.0, 7.0], [1.0, 2.0, 1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    advantages, returns = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    close(advantages, [[2.12, 1.0, 0.0], [1.5264, -0.38, 1.0]])  # row 1 is the full-length example above
    close(returns, [[2.62, 2.0, 0.0], [2.5264, 1.62, 2.0]])


def test_gae_with_gamma_lam_one_gives_reward_to_go():
    # gamma = lam = 1: A_t = sum_{k>=t} r_k - V_t, so returns = reward-to-go [1+2+3, 2+3, 3] = [6, 5, 3]
    rewards, values = torch.tensor([[1.0, 2.0, 3.0, 0.0]]), torch.tensor([[0.3, -1.0, 2.0, 9.0]])
    advantages, returns = gae_advantages(rewards, values, torch.tensor([[1, 1, 1, 0]]), gamma=1.0, lam=1.0)
    close(returns, [[6.0, 5.0, 3.0, 0.0]])
    close(advantages, [[5.7, 6.0, 1.0, 0.0]])


def test_gae_with_lam_zero_is_one_step_td():
    # lam = 0: A_t = delta_t. rewards [0, 1], values [2, 3], gamma 0.5: [0 + 1.5 - 2, 1 + 0 - 3] = [-0.5, -2]
    advantages, _ = gae_advantages(torch.tensor([[0.0, 1.0]]), torch.tensor([[2.0, 3.0]]), torch.ones(1, 2), 0.5, 0.0)
    close(advantages, [[-0.5, -2.0]])


def test_gae_carries_no_gradient():
    values = torch.tensor([[1.0, 2.0]], requires_grad=True)
    advantages, returns = gae_advantages(torch.ones(1, 2), values, torch.ones(1, 2), 0.9, 0.95)
    assert not advantages.requires_grad and not returns.requires_grad


# ---- whitening -----------------------------------------------------------------------------


def test_whiten_masked_entries_and_zero_padding():
    values = torch.tensor([[1.0, 2.0, 100.0], [3.0, 6.0, -50.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    # masked entries 1, 2, 3, 6: mean 3, deviations -2, -1, 0, 3, variance (4 + 1 + 0 + 9) / 4 = 3.5
    s = math.sqrt(3.5)
    out = whiten(values, mask)
    close(out, [[-2 / s, -1 / s, 0.0], [0.0, 3 / s, 0.0]])
    real = out[mask.bool()]
    assert real.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert real.std(correction=0).item() == pytest.approx(1.0, rel=1e-6)
    # shift_mean=False only rescales: the mean 3 is kept
    close(whiten(values, mask, shift_mean=False), [[3 - 2 / s, 3 - 1 / s, 0.0], [3.0, 3 + 3 / s, 0.0]])


def test_whiten_constant_values_do_not_blow_up():
    out = whiten(torch.full((2, 2), 4.0), torch.ones(2, 2))
    close(out, torch.zeros(2, 2))


# ---- policy loss ---------------------------------------------------------------------------


def test_policy_loss_at_ratio_one_is_minus_mean_advantage():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5]])
    advantages = torch.tensor([[1.0, -2.0, 3.0]])  # the 3 is padding
    loss, stats = policy_loss(logprobs, logprobs.clone(), advantages, torch.tensor([[1, 1, 0]]), clip_range=0.2)
    assert loss.item() == pytest.approx(-(1.0 - 2.0) / 2)  # -mean(1, -2) = 0.5
    assert stats["clip_fraction"].item() == 0.0
    assert stats["approx_kl"].item() == 0.0


def test_policy_loss_clips_ratio_above_one_plus_eps_for_positive_advantage():
    # ratio = 1.5, A = 2, eps = 0.2: max(-1.5 * 2, -1.2 * 2) = -2.4, the clipped branch binds
    old = torch.tensor([[-1.0, -2.0]])
    logprobs = (old + math.log(1.5)).requires_grad_()
    advantages = torch.full((1, 2), 2.0)
    loss, stats = policy_loss(logprobs, old, advantages, torch.ones(1, 2), clip_range=0.2)
    assert loss.item() == pytest.approx(-1.2 * 2.0, rel=1e-6)
    assert stats["clip_fraction"].item() == 1.0
    assert stats["approx_kl"].item() == pytest.approx(0.5 * math.log(1.5) ** 2, rel=1e-6)
    assert not stats["approx_kl"].requires_grad and stats["approx_kl"].dim() == 0
    loss.backward()  # clipped branch is constant in logprobs: no gradient
    assert logprobs.grad.abs().max().item() == 0.0


def test_policy_loss_mixed_tokens():
    # token 0: ratio 1.5, A = -1 -> max(1.5, 1.2) = 1.5, unclipped binds (pessimistic), no clip
    # token 1: ratio 0.5, A = 1  -> max(-0.5, -0.8) = -0.5, unclipped binds, no clip
    # token 2: ratio 0.5, A = -1 -> max(0.5, 0.8) = 0.8, clipped binds
    # token 3: padding (ratio 1.5, A = 10 would give -12)
    old = torch.zeros(1, 4)
    logprobs = torch.log(torch.tensor([[1.5, 0.5, 0.5, 1.5]])).requires_grad_()
    advantages = torch.tensor([[-1.0, 1.0, -1.0, 10.0]])
    loss, stats = policy_loss(logprobs, old, advantages, torch.tensor([[1, 1, 1, 0]]), clip_range=0.2)
    assert loss.item() == pytest.approx((1.5 - 0.5 + 0.8) / 3, rel=1e-6)
    assert stats["clip_fraction"].item() == pytest.approx(1 / 3)
    loss.backward()
    # d/dlogp of -A * exp(logp) / 3 = -A * ratio / 3 on unclipped tokens: [1.5/3, -0.5/3, 0, 0]
    close(logprobs.grad, [[0.5, -0.5 / 3, 0.0, 0.0]])


# ---- value loss ----------------------------------------------------------------------------


def test_value_loss_clipping():
    # c = 0.2
    # token 0: old 1, v 2,   R 1.5: clip(v) = 1.2; (2 - 1.5)^2 = 0.25 > (1.2 - 1.5)^2 = 0.09 -> 0.25, no clip
    # token 1: old 1, v 1.5, R 2:   clip(v) = 1.2; (1.5 - 2)^2 = 0.25 < (1.2 - 2)^2 = 0.64 -> 0.64, clipped
    # token 2: padding
    # loss = 0.5 * (0.25 + 0.64) / 2 = 0.2225
    values = torch.tensor([[2.0, 1.5, 9.0]], requires_grad=True)
    old = torch.tensor([[1.0, 1.0, 0.0]])
    returns = torch.tensor([[1.5, 2.0, -9.0]])
    loss, stats = value_loss(values, old, returns, torch.tensor([[1, 1, 0]]), clip_range_value=0.2)
    assert loss.item() == pytest.approx(0.2225, rel=1e-6)
    assert stats["value_clip_fraction"].item() == pytest.approx(0.5)
    loss.backward()
    # token 0: d/dv 0.5 * (v - R)^2 / 2 = (2 - 1.5) / 2 = 0.25; token 1 is clipped: 0; padding: 0
    close(values.grad, [[0.25, 0.0, 0.0]])


def test_value_loss_unclipped_is_half_mse():
    values, returns = torch.tensor([[1.0, 3.0]]), torch.tensor([[2.0, 1.0]])
    loss, stats = value_loss(values, values.clone(), returns, torch.ones(1, 2), clip_range_value=10.0)
    assert loss.item() == pytest.approx(0.5 * (1 + 4) / 2)  # 0.5 * mean(1, 4)
    assert stats["value_clip_fraction"].item() == 0.0


# ---- entropy and log-probs -----------------------------------------------------------------


def test_entropy_of_uniform_logits_is_log_vocab():
    close(entropy_from_logits(torch.zeros(2, 3, 5)), torch.full((2, 3), math.log(5.0)))
    # large logits must not overflow; float32 spacing near 1000 is 6e-5, hence the tolerance
    close(entropy_from_logits(torch.full((1, 4), 1000.0)), [math.log(4.0)], tol=1e-4)


def test_entropy_known_distribution_and_masked_logits():
    # logits [0, log 3] -> p = [1/4, 3/4]; H = -(1/4 log 1/4 + 3/4 log 3/4)
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    close(entropy_from_logits(torch.tensor([0.0, math.log(3.0)])), expected)
    # a -inf logit is a zero-probability token: H([0, -inf]) = 0 and H([0, 0, -inf]) = log 2, no nan
    close(entropy_from_logits(torch.tensor([[0.0, -math.inf], [0.0, 0.0]])), [0.0, LOG2])
    close(entropy_from_logits(torch.tensor([0.0, 0.0, -math.inf])), LOG2)
    # bfloat16 logits come back as float32
    assert entropy_from_logits(torch.zeros(2, 3, dtype=torch.bfloat16)).dtype == torch.float32


def test_logprobs_from_logits_by_hand():
    # row 0, both positions: logits [0, log 3, 0, 0] -> softmax [1/6, 1/2, 1/6, 1/6]
    # row 1, position 0: uniform over 4 -> log 1/4; position 1: [log 2, 0, 0, 0] -> p(token 0) = 2/5
    logits = torch.zeros(2, 2, 4)
    logits[0, :, 1] = math.log(3.0)
    logits[1, 1, 0] = LOG2
    tokens = torch.tensor([[1, 0], [3, 0]])
    out = logprobs_from_logits(logits, tokens)
    assert out.shape == (2, 2)
    close(out, [[math.log(0.5), math.log(1 / 6)], [math.log(0.25), math.log(0.4)]])


def test_logprobs_from_logits_gradient_is_onehot_minus_softmax():
    # d log softmax(z)[k] / dz = onehot(k) - softmax(z); uniform over 4, token 1: [-1/4, 3/4, -1/4, -1/4]
    logits = torch.zeros(1, 1, 4, requires_grad=True)
    logprobs_from_logits(logits, torch.tensor([[1]])).sum().backward()
    close(logits.grad, [[[-0.25, 0.75, -0.25, -0.25]]])


def test_logprobs_from_logits_large_and_half_precision_logits():
    # naive exp overflows; the answer is log 1/2 (float32 spacing near 1000 is 6e-5, hence the tolerance)
    logits = torch.tensor([[[1000.0, 1000.0, -1000.0]]])
    close(logprobs_from_logits(logits, torch.tensor([[0]])), [[-LOG2]], tol=1e-4)
    out = logprobs_from_logits(logits.to(torch.bfloat16), torch.tensor([[1]]))
    assert out.dtype == torch.float32
    close(out, [[-LOG2]], tol=1e-3)


# ---- explained variance --------------------------------------------------------------------


def test_explained_variance_cases():
    returns = torch.tensor([[1.0, 2.0, 3.0, 99.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert explained_variance(returns.clone(), returns, mask).item() == pytest.approx(1.0)
    # values = 0: Var[returns - 0] = Var[returns] -> 0
    assert explained_variance(torch.zeros(1, 4), returns, mask).item() == pytest.approx(0.0, abs=1e-6)
    # values = 2 everywhere (the mean): errors [-1, 0, 1] have the same variance as returns -> 0
    assert explained_variance(torch.full((1, 4), 2.0), returns, mask).item() == pytest.approx(0.0, abs=1e-6)
    # values [1, 2, 4]: errors [0, 0, -1], var = 2/9; Var[returns] = 2/3 -> 1 - (2/9)/(2/3) = 2/3
    values = torch.tensor([[1.0, 2.0, 4.0, -5.0]])
    assert explained_variance(values, returns, mask).item() == pytest.approx(2 / 3, rel=1e-6)


def test_explained_variance_constant_returns_is_zero_not_nan():
    ev = explained_variance(torch.tensor([[0.0, 1.0]]), torch.full((1, 2), 3.0), torch.ones(1, 2))
    assert ev.dim() == 0 and ev.item() == 0.0


# ---- KL controllers ------------------------------------------------------------------------


def test_adaptive_kl_controller_one_update():
    controller = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    controller.update(current_kl=12.0, n_steps=256)  # 12/6 - 1 = 1, clipped to 0.2
    assert controller.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))  # 0.100512
    controller = AdaptiveKLController(0.1, 6.0, 10000)
    controller.update(6.6, 1000)  # 6.6/6 - 1 = 0.1, not clipped: 0.1 * (1 + 0.1 * 0.1) = 0.101
    assert controller.value == pytest.approx(0.101)
    controller.update(0.0, 1000)  # 0/6 - 1 = -1 clipped to -0.2: 0.101 * (1 - 0.02) = 0.09898
    assert controller.value == pytest.approx(0.09898)
    controller.update(6.0, 1000)  # on target: unchanged
    assert controller.value == pytest.approx(0.09898)


def test_fixed_kl_controller_never_moves():
    controller = FixedKLController(0.05)
    controller.update(current_kl=100.0, n_steps=10**6)
    assert controller.value == 0.05


# ---- import hygiene ------------------------------------------------------------------------


def test_importing_ppo_math_pulls_in_no_heavy_frameworks():
    code = (
        "import sys, rlhf_ray.algo.ppo\n"
        "print(','.join(sorted(m for m in ('ray', 'deepspeed', 'vllm') if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"importing rlhf_ray.algo.ppo imported {out}"
