"""Length-sorted forward chunks (`sft.chunk_size`, `rm.chunk_size`) change padding, not the math:
the loss and every gradient match one padded pass over the whole micro-batch."""

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
        examples = [SFTExample([{"role": "user", "content": f"say {w}"}], (w + " ") * (i + 1), ref) for i, w in enumerate(words)]
        return tokenize_sft(examples, tokenizer, 64, "truncate_prompt").rows
    pairs = [PreferencePair([{"role": "user", "content": f"say {w}"}], w * (i % 3 + 1), words[-1 - i] * (i % 2 + 1), ref) for i, w in enumerate(words)]
    return tokenize_pairs(pairs, tokenizer, 64, "truncate_prompt").rows


@pytest.mark.parametrize("stage, lora", [("sft", False), ("sft", True), ("rm", False)])
def test_chunked_loss_and_gradients_match_one_padded_pass(stage, lora, tiny_model_dir, tiny_tokenizer):
    config = load_config("configs/tiny.yaml", [f"model.name_or_path={tiny_model_dir}", f"lora.enabled={str(lora).lower()}"])
    task = TASKS[stage]
    torch.manual_seed(0)
    model = task.build_model(config, str(tiny_model_dir), tiny_tokenizer.pad_token_id)
    rows = rows_of_many_lengths(stage, tiny_tokenizer)
    results = []
    for chunk_size in (0, 2):
        chunks = task.collate(rows, tiny_tokenizer.pad_token_id, chunk_size)
        assert len(chunks) == (1 if chunk_size == 0 else 3)
        model.zero_grad()
        loss, sums = task.loss_and_sums(model, chunks, config)
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        padded = sum(c["input_ids"].numel() for c in chunks)
        results.append((loss.item(), {k: float(v) for k, v in sums.items()}, grads, padded))
    (loss0, sums0, grads0, padded0), (loss2, sums2, grads2, padded2) = results
    assert padded2 < padded0  # fewer padded positions computed
    if stage == "sft":  # SFT projects only labelled positions to the vocabulary; the loss is the full-logits one
        from rlhf_ray.algo.losses import next_token_loss
        from rlhf_ray.train.batches import collate_sft

        batch = collate_sft(rows, tiny_tokenizer.pad_token_id)
        with torch.no_grad():
            total, count = next_token_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                           batch["labels"])
        assert loss0 == pytest.approx((total / count).item(), rel=1e-5)
    assert loss2 == pytest.approx(loss0, rel=1e-5)
    assert sums2 == pytest.approx(sums0, rel=1e-5)
    assert grads0.keys() == grads2.keys() and grads0
    for name in grads0:
        torch.testing.assert_close(grads2[name], grads0[name], rtol=1e-4, atol=1e-6, msg=name)
