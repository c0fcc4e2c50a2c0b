"""PPO actor classes built directly (no Ray) on the tiny model."""

import json
import math

import pytest
import torch

from actors.policy_learner import PolicyLearner
from actors.reference_model import ReferenceModel
from rlhf_ray.config import LoraConfig, PPOConfig
from rlhf_ray.models.safe_load import UnsafeCheckpoint
from rlhf_ray.wire import Experience, UpdateStats, pack
from tests.faults import plant_pickle

pytestmark = pytest.mark.component
PROMPTS = [[5, 6, 7, 8], [9, 10]]
RESPONSES = [[11, 12, 13], [14, 15, 16, 17, 18]]


@pytest.fixture()
def learner(tiny_model_dir):
    ppo = PPOConfig(rollout_batch_size=2, minibatch_size=2, micro_batch_size=1, ppo_epochs=2, lr=1e-2)
    return PolicyLearner(str(tiny_model_dir), LoraConfig(r=8, alpha=16), ppo, seed=0)


def manual_logprobs(model, prompt, response):
    """Log-probs of `response` after `prompt`, from one unpadded forward pass and a plain log-softmax."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return torch.stack([logp[len(prompt) - 1 + j, tok] for j, tok in enumerate(response)])


def make_experience(learner, batch):
    old_logprobs, values = learner.logprobs_and_values(batch)
    advantages = torch.tensor([[1.0, -0.5, 0.25, 0.0, 0.0], [0.5, 1.0, -1.0, 0.3, 0.2]]) * batch.response_mask
    zeros = torch.zeros_like(old_logprobs)
    return Experience(
        batch,
        old_logprobs,
        old_logprobs.clone(),
        values,
        torch.tensor([1.0, -1.0]),
        zeros,
        advantages,
        values + advantages,
    )


def test_learner_logprobs_match_a_fresh_forward_pass(learner, tiny_model_dir):
    batch = pack(PROMPTS, RESPONSES, pad_id=0)
    logprobs, values = learner.logprobs_and_values(batch)
    assert logprobs.shape == values.shape == (2, 5)
    for row, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES)):
        expected = manual_logprobs(learner.model, prompt, response)
        assert torch.allclose(logprobs[row, : len(response)], expected, atol=1e-5)
        assert logprobs[row, len(response) :].abs().sum() == 0 and values[row, len(response) :].abs().sum() == 0
    # at version 0 the LoRA update is zero: the reference model agrees with the learner
    reference = ReferenceModel(str(tiny_model_dir)).logprobs(batch)
    assert torch.allclose(reference, logprobs, atol=1e-5)


def test_bf16_mixed_learner_and_reference_give_fp32_logprobs_close_to_fp32(learner, tiny_model_dir):
    """bf16-mixed: fp32 weights, bf16 matmuls; log-probs and values come out in fp32, near the fp32 ones,
    the reference agrees with the learner at version 0, and an update trains the fp32 adapter."""
    ppo = PPOConfig(rollout_batch_size=2, minibatch_size=2, micro_batch_size=1, ppo_epochs=2, lr=1e-2)
    mixed = PolicyLearner(str(tiny_model_dir), LoraConfig(r=8, alpha=16), ppo, seed=0, precision="bf16-mixed")
    assert mixed.precision.bf16 and next(mixed.model.parameters()).dtype == torch.float32
    batch = pack(PROMPTS, RESPONSES, pad_id=0)
    exact, _ = learner.logprobs_and_values(batch)
    logprobs, values = mixed.logprobs_and_values(batch)
    assert logprobs.dtype == values.dtype == torch.float32
    assert not torch.equal(logprobs, exact)  # the matmuls did run in bf16
    torch.testing.assert_close(logprobs, exact, atol=0.05, rtol=0)
    reference = ReferenceModel(str(tiny_model_dir), precision="bf16-mixed").logprobs(batch)
    torch.testing.assert_close(reference, logprobs, atol=1e-5, rtol=0)
    lora_before = {n: p.detach().clone() for n, p in mixed.model.named_parameters() if "lora_B" in n}
    stats = mixed.train_step(make_experience(mixed, batch))
    assert stats["skipped_steps"] == 0 and mixed.version == 1
    assert all(not torch.equal(p, lora_before[n]) for n, p in mixed.model.named_parameters() if "lora_B" in n)
    assert all(p.dtype == torch.float32 for n, p in mixed.model.named_parameters() if "lora_" in n)


def test_response_only_projection_matches_the_whole_forward(learner, monkeypatch):
    """Log-probs, entropy, values and their gradients are the same as with the model's own forward, which
    projects every position to the vocabulary."""
    from rlhf_ray.models import forward

    batch = pack(PROMPTS, RESPONSES, pad_id=0)
    with torch.no_grad():
        for name, p in learner.model.named_parameters():
            if "lora_B" in name:  # a non-zero adapter, so LoRA is on the path
                p.normal_(std=0.1, generator=torch.Generator().manual_seed(0))

    def run():
        learner.module.zero_grad(set_to_none=True)
        out, values = learner.module(batch, entropy=True)
        (out.logprobs.sum() + out.entropy.sum() + values.sum()).backward()
        grads = {n: p.grad.clone() for n, p in learner.module.named_parameters() if p.grad is not None}
        return out, values, grads

    split = run()
    monkeypatch.setattr(forward, "backbone_and_head", lambda model: None)
    whole = run()
    for a, b in [(split[0].logprobs, whole[0].logprobs), (split[0].entropy, whole[0].entropy), (split[1], whole[1])]:
        assert torch.allclose(a, b, atol=1e-5)
    assert split[2].keys() == whole[2].keys() and any("lora_A" in n for n in split[2])
    for name in split[2]:
        assert torch.allclose(split[2][name], whole[2][name], atol=1e-5), name


def test_train_step_changes_only_adapter_and_value_head(learner, tiny_model_dir):
    before = {name: p.detach().clone() for name, p in learner.model.named_parameters()}
    head_before = learner.value_head.weight.detach().clone()
    stats = learner.train_step(make_experience(learner, pack(PROMPTS, RESPONSES, pad_id=0)))
    changed = {name for name, p in learner.model.named_parameters() if not torch.equal(before[name], p)}
    assert changed and all("lora_" in name for name in changed), changed
    assert any("lora_B" in name for name in changed)
    assert not torch.equal(head_before, learner.value_head.weight)
    assert stats["policy_version"] == 1 and learner.version == 1
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    fields = UpdateStats.__required_keys__ | UpdateStats.__optional_keys__
    assert set(stats) == fields - {"kl_loss"}  # every field but the KL loss term's (ppo.kl_in: reward), none other
    # the policy moved away from the frozen starting point
    batch = pack(PROMPTS, RESPONSES, pad_id=0)
    new_logprobs, _ = learner.logprobs_and_values(batch)
    reference = ReferenceModel(str(tiny_model_dir)).logprobs(batch)
    assert (new_logprobs - reference).abs().max() > 1e-3


def test_the_update_reuses_the_old_log_prob_forward_with_the_same_result(learner, tiny_model_dir):
    """The first micro-batch's forward, run with the old log-probs, gives the same update as running it again."""
    again = PolicyLearner(
        str(tiny_model_dir), LoraConfig(r=8, alpha=16), learner.ppo, seed=0, reuse_first_forward=False
    )
    batch = pack(PROMPTS, RESPONSES, pad_id=0)
    experiences = [make_experience(one, batch) for one in (learner, again)]  # each draws the same row order
    # the held rows ran with gradients, the others without: equal up to the kernels' rounding
    torch.testing.assert_close(experiences[0].old_logprobs, experiences[1].old_logprobs, rtol=1e-5, atol=1e-5)
    reused, rerun = (one.train_step(experiences[0]) for one in (learner, again))  # the same experience for both
    assert reused.pop("reused_first_forward") == 1.0 and rerun.pop("reused_first_forward") == 0.0
    assert reused == pytest.approx(rerun, rel=1e-6, abs=1e-9)
    for (name, a), b in zip(learner.module.named_parameters(), again.module.parameters()):
        assert torch.equal(a, b), name
    # a batch other than the one held, or changed weights, run the forward again
    experience = make_experience(learner, batch)
    learner.logprobs_and_values(pack(PROMPTS[::-1], RESPONSES[::-1], pad_id=0))
    assert learner.train_step(experience)["reused_first_forward"] == 0.0
    learner.logprobs_and_values(batch)
    learner.version += 1
    assert learner.train_step(experience)["reused_first_forward"] == 0.0


def test_a_learner_with_dropout_does_not_reuse_the_forward(tiny_model_dir):
    ppo = PPOConfig(rollout_batch_size=2, minibatch_size=2)
    learner = PolicyLearner(str(tiny_model_dir), LoraConfig(r=8, alpha=16, dropout=0.1), ppo, seed=0)
    assert not learner.reuse_first_forward
    assert (
        learner.train_step(make_experience(learner, pack(PROMPTS, RESPONSES, pad_id=0)))["reused_first_forward"] == 0.0
    )


def test_save_load_and_adapter_export(learner, tiny_model_dir, tmp_path):
    learner.train_step(make_experience(learner, pack(PROMPTS, RESPONSES, pad_id=0)))
    learner.save(tmp_path / "ckpt")
    payload = learner.export_adapter()
    assert payload.version == 1 and set(payload.files) >= {"adapter_config.json", "adapter_model.safetensors"}
    assert json.loads(payload.files["adapter_config.json"])["r"] == 8

    again = PolicyLearner(str(tiny_model_dir), LoraConfig(r=8, alpha=16), learner.ppo, seed=1)
    again.load(tmp_path / "ckpt")
    batch = pack(PROMPTS, RESPONSES, pad_id=0)
    assert again.version == 1
    for a, b in zip(learner.logprobs_and_values(batch), again.logprobs_and_values(batch)):
        assert torch.allclose(a, b, atol=1e-6)
    # the same next update from both: optimizer state and minibatch order were restored
    s1 = learner.train_step(make_experience(learner, batch))
    s2 = again.train_step(make_experience(again, batch))
    assert s1["policy_loss"] == pytest.approx(s2["policy_loss"], rel=1e-5, abs=1e-7)
    # a pickle planted as the optimizer state is refused on resume, without running
    marker = tmp_path / "the-pickle-ran"
    plant_pickle(tmp_path / "ckpt" / "learner_state.pt", marker)
    with pytest.raises(UnsafeCheckpoint, match="learner_state.pt: refused to load"):
        again.load(tmp_path / "ckpt")
    assert not marker.exists()


def test_merged_weights_give_the_trained_policy_in_a_plain_transformers_model(learner, tiny_model_dir):
    """After an update, the base model with the exported tensors put in computes the learner's log-probs."""
    from transformers import AutoModelForCausalLM

    batch = pack(PROMPTS, RESPONSES, pad_id=0)
    learner.train_step(make_experience(learner, batch))
    merged = learner.export_merged_weights()
    assert merged.version == 1
    # the whole attention block of every layer, and nothing else (the adapter is on q/k/v/o)
    assert merged.tensors and all(".self_attn." in name and "lora" not in name for name in merged.tensors)
    plain = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    state = plain.state_dict()
    assert set(merged.tensors) == {name for name in state if ".self_attn." in name}
    plain.load_state_dict({**state, **merged.tensors})
    logprobs, _ = learner.logprobs_and_values(batch)
    for row, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES)):
        assert torch.allclose(manual_logprobs(plain, prompt, response), logprobs[row, : len(response)], atol=1e-5)
    assert not torch.allclose(
        manual_logprobs(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), PROMPTS[0], RESPONSES[0]),
        logprobs[0, :3],
        atol=1e-3,
    )


def test_a_critic_free_learner_has_no_value_head_and_saves_none(tiny_model_dir, tmp_path):
    ppo = PPOConfig(advantage_estimator="grpo", responses_per_prompt=2, rollout_batch_size=1, minibatch_size=2, lr=1e-2)
    learner = PolicyLearner(str(tiny_model_dir), LoraConfig(r=8, alpha=16), ppo, seed=0)
    assert learner.value_head is None and learner.module.value_head is None
    assert all("lora_" in name for name, p in learner.module.named_parameters() if p.requires_grad)
    batch = pack(PROMPTS, RESPONSES, pad_id=0)
    logprobs, values = learner.logprobs_and_values(batch)
    assert values is None and logprobs.shape == (2, 5)
    advantages = torch.tensor([[1.0], [-1.0]]) * batch.response_mask
    experience = Experience(batch, logprobs, logprobs.clone(), None, torch.tensor([1.0, 0.0]), None, advantages, None)
    stats = learner.train_step(experience)
    assert stats["skipped_steps"] == 0 and learner.version == 1
    assert "value_loss" not in stats and "value_clip_fraction" not in stats and "policy_loss" in stats
    learner.save(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt" / "value_head.safetensors").exists()
    again = PolicyLearner(str(tiny_model_dir), LoraConfig(r=8, alpha=16), ppo, seed=1)
    again.load(tmp_path / "ckpt")
    torch.testing.assert_close(again.logprobs_and_values(batch)[0], learner.logprobs_and_values(batch)[0])


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batches_give_the_update_of_one_pass_over_the_minibatch(tiny_model_dir, aggregation):
    """Each micro-batch's loss share is normalised by the minibatch's totals, so accumulating two micro-batches
    of one row changes the weights as one pass over both rows does, whatever the aggregation."""
    updated = []
    for micro in (1, None):
        ppo = PPOConfig(
            rollout_batch_size=2,
            minibatch_size=2,
            micro_batch_size=micro,
            ppo_epochs=1,
            lr=1e-2,
            loss_aggregation=aggregation,
        )
        learner = PolicyLearner(str(tiny_model_dir), LoraConfig(r=8, alpha=16), ppo, seed=0, reuse_first_forward=False)
        stats = learner.train_step(make_experience(learner, pack(PROMPTS, RESPONSES, pad_id=0)))
        updated.append((stats, trainable_state(learner)))
    (micro_stats, micro_state), (whole_stats, whole_state) = updated
    assert micro_stats["policy_loss"] == pytest.approx(whole_stats["policy_loss"], rel=1e-5, abs=1e-7)
    for name in whole_state:
        torch.testing.assert_close(micro_state[name], whole_state[name], atol=1e-5, rtol=1e-4)


def test_kl_as_a_loss_term_is_reported_and_pulls_towards_the_reference(tiny_model_dir):
    ppo = PPOConfig(rollout_batch_size=2, minibatch_size=2, ppo_epochs=1, lr=1e-2, kl_in="loss", kl_estimator="k3")
    learner = PolicyLearner(str(tiny_model_dir), LoraConfig(r=8, alpha=16), ppo, seed=0)
    batch, mask = pack(PROMPTS, RESPONSES, pad_id=0), pack(PROMPTS, RESPONSES, pad_id=0).response_mask
    experience = make_experience(learner, batch)
    experience.advantages = torch.zeros_like(experience.advantages)  # only the KL term moves the policy
    experience.ref_logprobs = experience.old_logprobs - 0.5 * mask  # the reference likes the responses less
    stats = learner.train_step(experience, kl_coef=1.0)
    # one epoch of one minibatch: the loss is taken at the old weights, where k3 at r = -0.5 is exp(-0.5) - 1 + 0.5
    assert stats["kl_loss"] == pytest.approx(math.exp(-0.5) - 0.5, rel=1e-5)
    new_logprobs, _ = learner.logprobs_and_values(batch)
    assert ((new_logprobs - experience.old_logprobs) * mask).sum() < 0  # moved towards the reference
    assert "kl_loss" not in learner.train_step(make_experience(learner, batch), kl_coef=0.0)


def deepspeed_learner(tiny_model_dir, ppo, seed=0, zero_stage=2):
    from rlhf_ray.config import load_config
    from rlhf_ray.models.optim import learner_deepspeed_config

    config = load_config(
        "configs/tiny.yaml",
        [
            "ppo.learner_backend=deepspeed",
            f"deepspeed.zero_stage={zero_stage}",
            f"ppo.minibatch_size={ppo.minibatch_size}",
            f"ppo.micro_batch_size={ppo.micro_batch_size}",
            f"ppo.lr={ppo.lr}",
        ],
    )
    return PolicyLearner(
        str(tiny_model_dir),
        LoraConfig(r=8, alpha=16),
        ppo,
        seed=seed,
        deepspeed_config=learner_deepspeed_config(config),
    )


def trainable_state(learner):
    return {name: p.detach().clone() for name, p in learner.module.named_parameters() if p.requires_grad}


def test_deepspeed_learner_matches_the_torch_learner(learner, tiny_model_dir, tmp_path):
    """ppo.learner_backend=deepspeed (ZeRO-2, one gloo process on CPU) makes the same updates as plain torch AdamW,
    skips a NaN minibatch's step by itself, and resumes from its own checkpoint with the same next update."""
    ds = deepspeed_learner(tiny_model_dir, learner.ppo)
    assert ds.backend.engine.zero_optimization_stage() == 2
    assert (
        learner.backend.optimizer.defaults["fused"] and ds.backend.engine.basic_optimizer.defaults["fused"]
    )  # one AdamW kernel
    batch = pack(PROMPTS, RESPONSES, pad_id=0)
    for _ in range(2):
        torch_stats = learner.train_step(make_experience(learner, batch))
        ds_stats = ds.train_step(make_experience(ds, batch))
        assert ds_stats["policy_version"] == torch_stats["policy_version"] and ds_stats["skipped_steps"] == 0
        for key in ("policy_loss", "value_loss", "grad_norm", "clip_fraction"):
            assert ds_stats[key] == pytest.approx(torch_stats[key], rel=1e-4, abs=1e-6), key
    reference = trainable_state(learner)
    for name, value in trainable_state(ds).items():
        torch.testing.assert_close(value, reference[name], rtol=1e-4, atol=1e-6, msg=name)

    # a NaN advantage: every optimizer step of this experience is skipped and nothing changes
    before = trainable_state(ds)
    poisoned = make_experience(ds, batch)
    poisoned.advantages[0, 0] = float("nan")
    stats = ds.train_step(poisoned)
    assert stats["skipped_steps"] == ds.ppo.ppo_epochs and stats["update_skipped"] == 1.0 and ds.version == 2
    assert all(torch.equal(before[name], value) for name, value in trainable_state(ds).items())

    # save, load into a fresh engine, and both take the same next step
    ds.save(tmp_path / "ckpt")
    assert not any("base_layer" in p.name for p in (tmp_path / "ckpt" / "deepspeed").rglob("*"))
    again = deepspeed_learner(tiny_model_dir, learner.ppo, seed=1)
    again.load(tmp_path / "ckpt")
    assert again.version == 2
    s1, s2 = ds.train_step(make_experience(ds, batch)), again.train_step(make_experience(again, batch))
    assert s1["policy_loss"] == pytest.approx(s2["policy_loss"], rel=1e-5, abs=1e-7)
    after = trainable_state(ds)
    for name, value in trainable_state(again).items():
        torch.testing.assert_close(value, after[name], rtol=1e-5, atol=1e-7, msg=name)
    # a torch-backend learner refuses the DeepSpeed checkpoint, with the reason
    with pytest.raises(ValueError, match="deepspeed learner backend"):
        learner.load(tmp_path / "ckpt")
    # DeepSpeed's files are read by the weights-only loader: a planted pickle is refused, unrun
    marker = tmp_path / "the-pickle-ran"
    (optimizer_file,) = (tmp_path / "ckpt" / "deepspeed").rglob("*optim_states.pt")
    plant_pickle(optimizer_file, marker)
    with pytest.raises(UnsafeCheckpoint, match="optim_states.pt: refused to load"):
        again.load(tmp_path / "ckpt")
    assert not marker.exists()


def test_deepspeed_learner_needs_zero_stage_1_or_2():
    from rlhf_ray.config import load_config
    from rlhf_ray.models.optim import learner_deepspeed_config

    for stage in (0, 3):
        config = load_config("configs/tiny.yaml", ["ppo.learner_backend=deepspeed", f"deepspeed.zero_stage={stage}"])
        with pytest.raises(ValueError, match=f"ZeRO stage 1 or 2.*got stage {stage}"):
            learner_deepspeed_config(config)


def test_update_uses_the_update_threads_and_gives_them_back(tiny_model_dir, monkeypatch):
    """Ray gives an actor with under 2 CPUs one torch thread; the update (which runs alone) takes
    resources.learner_update_threads (default: every core the process may use), then returns to the actor's."""
    import os

    ppo = PPOConfig(rollout_batch_size=2, minibatch_size=2, ppo_epochs=1, lr=1e-2)
    assert PolicyLearner(str(tiny_model_dir), LoraConfig(r=8, alpha=16), ppo).update_threads == len(
        os.sched_getaffinity(0)
    )
    learner = PolicyLearner(str(tiny_model_dir), LoraConfig(r=8, alpha=16), ppo, update_threads=3)
    seen = []
    original = learner._train_epochs
    monkeypatch.setattr(learner, "_train_epochs", lambda *args: seen.append(torch.get_num_threads()) or original(*args))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        learner.train_step(make_experience(learner, pack(PROMPTS, RESPONSES, pad_id=0)))
        assert seen == [3] and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
