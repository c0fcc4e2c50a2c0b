"""The PPO loop learns: SmolLM2-135M-Instruct as the policy against a reward the test defines."""

import json

import pytest

from rlhf_ray.config import load_config

pytestmark = pytest.mark.e2e

ITERATIONS = 8
MAX_NEW_TOKENS = 16
MARGIN = 0.15  # rise of the share of responses that end within MAX_NEW_TOKENS, last 3 vs first 3 iterations
# Asked this way, SmolLM2 finished about 25% of its answers within 16 tokens before any training (measured here).
PROMPT_SUFFIX = " Answer in one short sentence."
KL_BOUND = 8.0  # nats per sequence


@pytest.fixture(scope="module")
def brevity_reward_dir(tmp_path_factory, smollm2_dir):
    """A reward model the test builds: a one-layer backbone whose attention and MLP outputs are zero, so
    its last hidden state is the last token's embedding, with the scalar head pointing at the newline
    token. A finished response ends with the chat template's "<|im_end|>\\n" and scores highest; one cut
    off at MAX_NEW_TOKENS ends on an arbitrary token. The policy must learn to answer briefly."""
    import torch
    from transformers import AutoConfig, LlamaConfig, LlamaForSequenceClassification

    from rlhf_ray.models.loading import load_tokenizer

    tokenizer = load_tokenizer(smollm2_dir)
    vocab = AutoConfig.from_pretrained(str(smollm2_dir)).vocab_size
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"][-1]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        direction = model.model.embed_tokens.weight[newline]
        model.score.weight.copy_(direction / direction.norm())
    folder = tmp_path_factory.mktemp("models") / "brevity-rm"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
def test_ppo_learns_to_answer_briefly(ray_local, tmp_path, smollm2_dir, brevity_reward_dir, precision):
    from rlhf_ray.ppo.run import run_ppo

    prompts = tmp_path / "prompts.jsonl"
    with open("data/demo/prompts.jsonl") as source, open(prompts, "w") as target:
        for line in source:
            target.write(json.dumps({"prompt": json.loads(line)["prompt"] + PROMPT_SUFFIX}) + "\n")
    config = load_config(
        "configs/demo.yaml",
        [
            f"data.prompts.path={prompts}",
            f"run.output_dir={tmp_path}",
            f"run.name=learn-{precision}",
            f"model.precision={precision}",
            f"ppo.policy_model={smollm2_dir}",
            f"ppo.reward_model={brevity_reward_dir}",
            f"ppo.iterations={ITERATIONS}",
            "ppo.rollout_batch_size=8",
            "ppo.responses_per_prompt=2",
            "ppo.minibatch_size=8",
            "ppo.ppo_epochs=2",
            "ppo.lr=1e-4",
            f"ppo.max_new_tokens={MAX_NEW_TOKENS}",
            "ppo.normalize_reward=false",
            "ppo.checkpoint_every=0",
            "ppo.sample_every=0",
            "resources.actor_num_cpus=0.5",
        ],
    )
    result = run_ppo(config)
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    finished = [r["finished_fraction"] for r in rows]
    rewards = [r["reward_mean"] for r in rows]
    before, after = sum(finished[:3]) / 3, sum(finished[-3:]) / 3
    max_kl = max(r["kl"] for r in rows)
    gap = max(r["generator_logprob_gap"] for r in rows)
    print(
        f"\nPPO learning check (SmolLM2-135M-Instruct, {precision}, {ITERATIONS} iterations): "
        f"finished share {before:.2f} -> "
        f"{after:.2f} (needed +{MARGIN}); reward {sum(rewards[:3]) / 3:.3f} -> {sum(rewards[-3:]) / 3:.3f}; "
        f"max KL {max_kl:.3f} (bound {KL_BOUND}); largest generator log-prob gap {gap:.2g}"
    )
    assert after - before >= MARGIN, finished
    assert sum(rewards[-3:]) > sum(rewards[:3]), rewards
    assert max_kl < KL_BOUND
