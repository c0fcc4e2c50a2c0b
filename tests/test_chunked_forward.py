"""Length-sorted forward chunks (`sft.chunk_size`, `rm.chunk_size`), packed SFT rows (`sft.packing`) and the
RM's shared-prompt rows change padding, not the math: the loss and every gradient match one padded pass
over the whole micro-batch."""

import pytest
import torch

from rlhf_ray.config import load_config
from rlhf_ray.train.tasks import TASKS

pytestmark = pytest.mark.component


def rows_of_many_lengths(stage: str, tokenizer) -> list[dict]:
    from rlhf_ray.formats.parsers import PreferencePair, SFTExample
    from rlhf_ray.formats.rows import RowRef
    from rlhf_ray.train.batches import tokenize_pairs, tokenize_sft

    words = ["alpha", "beta gamma", "delta epsilon zeta eta", "theta", "iota kappa lambda mu nu xi omicron pi", "rho"]
    ref = RowRef("mem", 1)
    if stage == "sft":
        examples = [
            SFTExample([{"role": "user", "content": f"say {w}"}], (w + " ") * (i + 1), ref) for i, w in enumerate(words)
        ]
        return tokenize_sft(examples, tokenizer, 64, "truncate_prompt").rows
    pairs = [
        PreferencePair([{"role": "user", "content": f"say {w}"}], w * (i % 3 + 1), words[-1 - i] * (i % 2 + 1), ref)
        for i, w in enumerate(words)
    ]
    return tokenize_pairs(pairs, tokenizer, 64, "truncate_prompt").rows


def loss_sums_and_grads(task, model, chunks, config):
    model.zero_grad()
    loss, sums = task.loss_and_sums(model, chunks, config)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.item(), {k: float(v) for k, v in sums.items()}, grads


def assert_same_grads(got: dict, expected: dict, rtol: float = 1e-4):
    """Every gradient equal up to float32 summation order (tolerance scaled to the tensor's largest entry)."""
    assert got.keys() == expected.keys() and expected
    for name in expected:
        atol = max(1e-6, 1e-5 * float(expected[name].abs().max()))
        torch.testing.assert_close(got[name], expected[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("stage, lora", [("sft", False), ("sft", True), ("rm", False)])
def test_chunked_loss_and_gradients_match_one_padded_pass(stage, lora, tiny_model_dir, tiny_tokenizer):
    config = load_config(
        "configs/tiny.yaml",
        [
            f"model.name_or_path={tiny_model_dir}",
            f"lora.enabled={str(lora).lower()}",
            "rm.shared_prompt=false",
            "sft.packing=false",
        ],
    )
    task = TASKS[stage]
    torch.manual_seed(0)
    model = task.build_model(config, str(tiny_model_dir), tiny_tokenizer.pad_token_id)
    rows = rows_of_many_lengths(stage, tiny_tokenizer)
    results = []
    for chunk_size in (0, 2):
        chunks = task.collate(rows, tiny_tokenizer.pad_token_id, chunk_size, config)
        assert len(chunks) == (1 if chunk_size == 0 else 3)
        padded = sum(c["input_ids"].numel() for c in chunks)
        results.append((*loss_sums_and_grads(task, model, chunks, config), padded))
    (loss0, sums0, grads0, padded0), (loss2, sums2, grads2, padded2) = results
    assert padded2 < padded0  # fewer padded positions computed
    if stage == "sft":  # SFT projects only labelled positions to the vocabulary; the loss is the full-logits one
        from rlhf_ray.algo.losses import next_token_loss
        from rlhf_ray.train.batches import collate_sft

        batch = collate_sft(rows, tiny_tokenizer.pad_token_id)
        with torch.no_grad():
            total, count = next_token_loss(
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"]
            )
        assert loss0 == pytest.approx((total / count).item(), rel=1e-5)
    assert loss2 == pytest.approx(loss0, rel=1e-5)
    assert sums2 == pytest.approx(sums0, rel=1e-5)
    assert_same_grads(grads2, grads0)


@pytest.mark.parametrize("lora", [False, True])
def test_packed_sft_rows_give_the_loss_and_gradients_of_one_row_per_sequence(lora, tiny_model_dir, tiny_tokenizer):
    overrides = [f"model.name_or_path={tiny_model_dir}", f"lora.enabled={str(lora).lower()}"]
    task, pad = TASKS["sft"], tiny_tokenizer.pad_token_id
    rows = rows_of_many_lengths("sft", tiny_tokenizer)
    torch.manual_seed(0)
    model = task.build_model(
        load_config("configs/tiny.yaml", overrides + ["data.max_length=64"]), str(tiny_model_dir), pad
    )
    results, widths = {}, {}
    for packing in (False, True):
        config = load_config(
            "configs/tiny.yaml",
            overrides + ["data.max_length=64", f"sft.packing={str(packing).lower()}", "sft.chunk_size=0"],
        )
        chunks = task.collate(rows, pad, 0, config)
        widths[packing] = sum(c["input_ids"].numel() for c in chunks)
        results[packing] = loss_sums_and_grads(task, model, chunks, config)
    (loss_apart, sums_apart, grads_apart), (loss_packed, sums_packed, grads_packed) = results[False], results[True]
    assert widths[True] < widths[False]  # fewer padded positions computed
    assert loss_packed == pytest.approx(loss_apart, rel=1e-5)
    assert sums_packed == pytest.approx(sums_apart, rel=1e-5)  # includes the labelled and the real tokens counted
    assert_same_grads(grads_packed, grads_apart)


def test_packed_sft_layout_keeps_the_sequences_apart():
    from rlhf_ray.algo.losses import IGNORE_INDEX as X
    from rlhf_ray.train.batches import collate_packed_sft

    rows = [
        {"input_ids": [1, 2, 3], "labels": [X, 2, 3]},
        {"input_ids": [4, 5, 6, 7, 10], "labels": [X, X, 6, 7, 10]},
        {"input_ids": [8, 9], "labels": [8, 9]},
        {"input_ids": [11], "labels": [X]},
    ]
    batch = collate_packed_sft(rows, pad_id=0)  # rows no longer than the longest sequence, first fit, longest first
    assert batch["input_ids"].tolist() == [[4, 5, 6, 7, 10], [1, 2, 3, 8, 9], [11, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[X, X, 6, 7, 10], [X, 2, 3, X, 9], [X, X, X, X, X]]  # 8 is not predicted from 3
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 1], [0, 0, 0, 0, 0]]
    assert int(batch["sequence_tokens"]) == 11
    allowed = batch["attention_mask"][1, 0]
    assert allowed[4].tolist() == [False, False, False, True, True]  # token 9 sees only its own sequence
    assert allowed[2].tolist() == [True, True, True, False, False]
    assert batch["attention_mask"][2, 0, 1].tolist() == [False, True, False, False, False]  # padding: only itself


def test_a_model_that_ignores_the_packed_mask_is_refused_at_start(tiny_model_dir, tiny_tokenizer, monkeypatch):
    from rlhf_ray.train import tasks

    config = load_config("configs/tiny.yaml", [f"model.name_or_path={tiny_model_dir}"])
    model = tasks.build_causal_lm(config, str(tiny_model_dir))
    assert tasks.packing_problem(model, tiny_tokenizer.pad_token_id, 64) is None
    backbone_forward = model.model.forward  # (transformers alone finds packed rows from restarting position ids)
    monkeypatch.setattr(
        model.model, "forward", lambda *a, attention_mask=None, position_ids=None, **kw: backbone_forward(*a, **kw)
    )
    problem = tasks.packing_problem(model, tiny_tokenizer.pad_token_id, 64)
    assert problem and "attention mask" in problem
    monkeypatch.setattr(tasks, "build_causal_lm", lambda *a: model)
    with pytest.raises(ValueError, match="sft.packing=false"):
        TASKS["sft"].build_model(config, str(tiny_model_dir), tiny_tokenizer.pad_token_id)


def test_a_sliding_window_shorter_than_a_packed_row_is_refused(tiny_model_dir, tiny_tokenizer):
    from rlhf_ray.train import tasks

    config = load_config("configs/tiny.yaml", [f"model.name_or_path={tiny_model_dir}"])
    pad = tiny_tokenizer.pad_token_id
    causal_lm = tasks.build_causal_lm(config, str(tiny_model_dir))
    reward_model = tasks.build_reward_model(config, str(tiny_model_dir), pad)
    for model in (causal_lm, reward_model):
        model.config.sliding_window = 48
    assert tasks.packing_problem(causal_lm, pad, 40) is None  # rows no longer than 40 tokens fit the window
    assert "sliding-window" in tasks.packing_problem(causal_lm, pad, 64)
    assert "sliding-window" in tasks.shared_prompt_problem(reward_model, pad, 32)  # a pair's row: up to 64


def pairs_with_edge_cases(tokenizer) -> list[dict]:
    """Tokenized pairs of many lengths, plus pairs whose responses share their first tokens, whose rejected
    sequence is the chosen one cut short, and that end in the pad token (pooled before it, as transformers does)."""
    rows = rows_of_many_lengths("rm", tokenizer)
    base, pad = rows[0]["chosen_ids"], tokenizer.pad_token_id
    rows.append({"chosen_ids": base + [7, 8, 9], "rejected_ids": base + [7, 8, 10, 11]})
    rows.append({"chosen_ids": base + [7, 8, 9], "rejected_ids": base + [7]})
    rows.append({"chosen_ids": base + [5, pad], "rejected_ids": base + [6, 6, pad]})
    return rows


@pytest.mark.parametrize("lora", [False, True])
def test_shared_prompt_pass_gives_the_scores_and_gradients_of_separate_passes(lora, tiny_model_dir, tiny_tokenizer):
    from rlhf_ray.train.batches import packed_pair_length

    overrides = [f"model.name_or_path={tiny_model_dir}", f"lora.enabled={str(lora).lower()}"]
    task, pad = TASKS["rm"], tiny_tokenizer.pad_token_id
    rows = pairs_with_edge_cases(tiny_tokenizer)
    torch.manual_seed(0)
    model = task.build_model(load_config("configs/tiny.yaml", overrides), str(tiny_model_dir), pad)
    with torch.no_grad():  # a trained-looking head, so that scores differ from pair to pair
        torch.nn.init.normal_(next(p for n, p in model.named_parameters() if "score" in n and p.requires_grad))
    results = {}
    for shared in (False, True):
        config = load_config("configs/tiny.yaml", overrides + [f"rm.shared_prompt={str(shared).lower()}"])
        chunks = task.collate(rows, pad, 3, config)
        results[shared] = loss_sums_and_grads(task, model, chunks, config)
        if shared:
            assert sum(c["attention_mask"][:, 0].diagonal(dim1=1, dim2=2).sum() for c in chunks) >= sum(
                map(packed_pair_length, rows)
            )
    (loss_apart, sums_apart, grads_apart), (loss_shared, sums_shared, grads_shared) = results[False], results[True]
    assert loss_shared == pytest.approx(loss_apart, rel=1e-5)
    assert sums_shared == pytest.approx(sums_apart, rel=1e-5, abs=1e-6)  # includes seq_tokens: the same tokens counted
    assert_same_grads(grads_shared, grads_apart)
    computed = sum(map(packed_pair_length, rows))
    assert computed < sums_apart["seq_tokens"]


def test_shared_prompt_layout_keeps_the_continuations_apart():
    from rlhf_ray.train.batches import collate_shared_prompt_pairs

    batch = collate_shared_prompt_pairs(
        [{"chosen_ids": [1, 2, 3, 4], "rejected_ids": [1, 2, 5]}, {"chosen_ids": [1, 9], "rejected_ids": [1, 8]}],
        pad_id=0,
    )
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [1, 9, 8, 0, 0]]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 2]  # rejected's token 5 sits at position 2, as alone
    assert batch["chosen_at"].tolist() == [3, 1] and batch["rejected_at"].tolist() == [4, 2]
    assert int(batch["sequence_tokens"]) == 7 + 4
    allowed = batch["attention_mask"][0, 0]
    assert allowed[4].tolist() == [True, True, False, False, True]  # rejected sees the prompt and itself
    assert allowed[3].tolist() == [True, True, True, True, False]
    assert batch["attention_mask"][1, 0, 3].tolist() == [False, False, False, True, False]  # padding: only itself


def test_a_model_that_ignores_position_ids_is_refused_at_start(tiny_model_dir, tiny_tokenizer, monkeypatch):
    from rlhf_ray.train import tasks

    config = load_config("configs/tiny.yaml", [f"model.name_or_path={tiny_model_dir}"])
    model = tasks.build_reward_model(config, str(tiny_model_dir), tiny_tokenizer.pad_token_id)
    assert tasks.shared_prompt_problem(model, tiny_tokenizer.pad_token_id, 64) is None
    backbone_forward = model.model.forward
    monkeypatch.setattr(model.model, "forward", lambda *a, position_ids=None, **kw: backbone_forward(*a, **kw))
    problem = tasks.shared_prompt_problem(model, tiny_tokenizer.pad_token_id, 64)
    assert problem and "position ids" in problem
    monkeypatch.setattr(tasks, "build_reward_model", lambda *a: model)
    with pytest.raises(ValueError, match="rm.shared_prompt=false"):
        TASKS["rm"].build_model(config, str(tiny_model_dir), tiny_tokenizer.pad_token_id)


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_bf16_mixed_loss_is_fp32_and_within_bf16_tolerance_of_the_fp32_loss(stage, tiny_model_dir, tiny_tokenizer):
    """The jobs' bf16-mixed context (autocast over fp32 weights): the loss is an fp32 tensor near the fp32 loss,
    and fp32 gradients reach the fp32 weights, near the fp32 run's but not equal to them (bf16 matmuls ran)."""
    from rlhf_ray.models.precision import Precision, autocast

    config = load_config("configs/tiny.yaml", [f"model.name_or_path={tiny_model_dir}"])
    task = TASKS[stage]
    torch.manual_seed(0)
    model = task.build_model(config, str(tiny_model_dir), tiny_tokenizer.pad_token_id)
    chunks = task.collate(rows_of_many_lengths(stage, tiny_tokenizer), tiny_tokenizer.pad_token_id, 0, config)
    exact, _, exact_grads = loss_sums_and_grads(task, model, chunks, config)
    with autocast(Precision(True, "bf16-mixed (test)")):
        model.zero_grad()
        mixed, _ = task.loss_and_sums(model, chunks, config)
    mixed.backward()
    assert mixed.dtype == torch.float32
    assert mixed.item() == pytest.approx(exact, rel=2e-2)
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == exact_grads.keys()
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())
    assert any(not torch.equal(grads[name], exact_grads[name]) for name in grads)
    for name in grads:
        scale = float(exact_grads[name].abs().max())
        torch.testing.assert_close(grads[name], exact_grads[name], rtol=0, atol=max(0.1 * scale, 1e-6), msg=name)
