"""`rlhf-ray eval rm` and `rlhf-ray eval policy` as Ray jobs on tiny models (and once on the real model)."""

import json
import math
from pathlib import Path

import pytest
import torch

from rlhf_ray.cli import main
from rlhf_ray.config import load_config

pytestmark = pytest.mark.ray


def tiny_config(tmp_path, model_dir, *overrides):
    return load_config(
        "configs/tiny.yaml",
        [f"model.name_or_path={model_dir}", f"run.output_dir={tmp_path}", "run.name=eval", *overrides],
    )


def write_pairs(folder: Path) -> Path:
    """Two source files of preference pairs with distinct prompts."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        {"prompt": f"Name thing number {i}.", "chosen": " ".join(["A fine answer."] * (1 + i % 3)), "rejected": "No."}
        for i in range(6)
    ]
    (folder / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    (folder / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[4:]))
    return folder


def local_scores(reward_dir, tokenizer, prompt_messages, response):
    """A reward model's raw score of one (prompt, response), computed here with transformers directly."""
    from transformers import AutoModelForSequenceClassification

    from rlhf_ray.tokenization import prompt_ids, response_ids

    model = AutoModelForSequenceClassification.from_pretrained(str(reward_dir)).eval()
    p = prompt_ids(tokenizer, prompt_messages)
    ids = torch.tensor([p + response_ids(tokenizer, prompt_messages, response, p)])
    with torch.no_grad():
        return float(model(input_ids=ids).logits[0, 0])


def test_eval_rm_scores_every_pair_per_file(
    ray_local, tmp_path, tiny_model_dir, tiny_reward_dir, tiny_tokenizer, capsys
):
    data = write_pairs(tmp_path / "pairs")
    out = tmp_path / "out"
    code = main(
        [
            "eval",
            "rm",
            "configs/tiny.yaml",
            f"model.name_or_path={tiny_model_dir}",
            f"run.output_dir={tmp_path}",
            "data.max_length=256",
            "data.max_prompt_length=200",  # nothing truncated: the local scores see it all
            "--model",
            str(tiny_reward_dir),
            "--data",
            str(data),
            "--split",
            "all",
            "--out",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err[-3000:]
    results = json.loads((out / "eval.json").read_text())
    ((name, result),) = results["models"].items()
    assert set(result["per_file"]) == {str(data / "a.jsonl"), str(data / "b.jsonl")}
    assert result["overall"]["pairs"] == 6 and result["per_file"][str(data / "b.jsonl")]["pairs"] == 2
    # the accuracy and margin agree with scores computed here, pair by pair
    user = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    margins = []
    for i in range(6):
        chosen = local_scores(
            tiny_reward_dir, tiny_tokenizer, user(f"Name thing number {i}."), " ".join(["A fine answer."] * (1 + i % 3))
        )
        rejected = local_scores(tiny_reward_dir, tiny_tokenizer, user(f"Name thing number {i}."), "No.")
        margins.append(chosen - rejected)
    assert result["overall"]["mean_margin"] == pytest.approx(sum(margins) / 6, abs=1e-5)
    assert result["overall"]["accuracy"] == pytest.approx(sum(m > 0 for m in margins) / 6)
    assert result["per_file"][str(data / "b.jsonl")]["mean_margin"] == pytest.approx(sum(margins[4:]) / 2, abs=1e-5)
    assert result["overall"]["longer_chosen"] == 1.0  # every chosen response is the longer one
    report = (out / "report.md").read_text()
    assert "calibration error" in report and str(data / "a.jsonl") in report
    assert "accuracy" in capsys.readouterr().out


def perturbed_copy(model_dir: Path, out: Path, scale: float = 0.5) -> Path:
    """The tiny model with noise added to every weight: a second policy that samples differently."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, out)
    weights = load_file(str(model_dir / "model.safetensors"))
    generator = torch.Generator().manual_seed(1)
    noisy = {
        k: v + scale * v.std() * torch.randn(v.shape, generator=generator) if v.dim() > 1 else v
        for k, v in weights.items()
    }
    save_file(noisy, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_eval_policy_against_itself_ties_and_against_another_measures_kl(
    ray_local, tmp_path, tiny_model_dir, tiny_reward_dir, tiny_tokenizer
):
    from actors.reference_model import ReferenceModel
    from rlhf_ray.evaluation.launch import PolicyEvalRequest, run_eval_policy
    from rlhf_ray.ppo.prompts import load_prompt_set
    from rlhf_ray.wire import pack

    other = perturbed_copy(tiny_model_dir, tmp_path / "other")
    config = tiny_config(tmp_path, tiny_model_dir, "ppo.max_new_tokens=6")
    request = PolicyEvalRequest(
        policies=[str(tiny_model_dir), str(tiny_model_dir), str(other)],
        reward_models=[str(tiny_reward_dir)],
        data="data/demo/prompts.jsonl",
        limit=5,
        samples_per_prompt=2,
        names=["start", "same", "other"],
    )
    out = tmp_path / "policy"
    results = run_eval_policy(config, request, out)
    start, same, different = (results["policies"][n] for n in ("start", "same", "other"))
    rm = next(iter(start["reward"]))
    assert start["samples"] == same["samples"] == 10
    # the same policy with the same seeds samples the same tokens: every comparison a tie, no KL, no gain
    assert same["reward"][rm]["win_rate_vs_first"]["rate"] == 0.5 and same["kl_to_first"] == pytest.approx(0, abs=1e-6)
    assert same["reward"][rm]["gain_in_first_std"] == pytest.approx(0.0, abs=1e-9)
    assert start["reward"][rm]["mean"] == pytest.approx(same["reward"][rm]["mean"])
    # the other policy's KL is the mean over its samples of sum(log p_other - log p_start), computed here
    tokens = json.loads((out / "samples.json").read_text())
    prompts = load_prompt_set(config, tiny_tokenizer, split="test").token_ids[:5]
    rows = tokens["other"]
    batch = pack([prompts[i] for i in rows["prompt_index"]], rows["responses"], tiny_tokenizer.pad_token_id)
    own = ReferenceModel(str(other)).logprobs(batch)
    base = ReferenceModel(str(tiny_model_dir)).logprobs(batch)
    expected = float(((own - base) * batch.response_mask).sum(-1).mean())
    assert different["kl_to_first"] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert not math.isclose(different["kl_to_first"], 0.0, abs_tol=1e-3)
    for name in ("report.md", "samples.md", "samples.html"):
        assert (out / name).stat().st_size > 0
    assert "win-rate" in (out / "report.md").read_text()


@pytest.mark.e2e
def test_eval_policy_on_the_real_model(ray_local, tmp_path, smollm2_dir):
    """SmolLM2 against itself on held-out prompts, judged by a reward head on SmolLM2 (seeded, untrained)."""
    from transformers import AutoModelForSequenceClassification

    from rlhf_ray.evaluation.launch import PolicyEvalRequest, run_eval_policy
    from rlhf_ray.models.loading import load_tokenizer

    torch.manual_seed(0)
    rm_dir = tmp_path / "rm"
    rm = AutoModelForSequenceClassification.from_pretrained(str(smollm2_dir), num_labels=1)
    rm.config.pad_token_id = load_tokenizer(smollm2_dir).pad_token_id
    rm.save_pretrained(rm_dir)
    config = tiny_config(
        tmp_path, smollm2_dir, "ppo.max_new_tokens=24", "data.max_prompt_length=100", "data.max_length=128"
    )
    request = PolicyEvalRequest(
        policies=[str(smollm2_dir), str(smollm2_dir)],
        reward_models=[str(rm_dir)],
        data="data/demo/prompts.jsonl",
        limit=4,
        names=["a", "b"],
    )
    results = run_eval_policy(config, request, tmp_path / "out")
    b = results["policies"]["b"]
    assert b["reward"]["rm"]["win_rate_vs_first"]["rate"] == 0.5 and abs(b["kl_to_first"]) < 1e-4
    assert 0 < b["response_tokens"] <= 24 and 0 <= b["finish_rate"] <= 1
    samples = (tmp_path / "out" / "samples.md").read_text()
    assert samples.count("\n") >= 6  # header, rule and 4 rows
