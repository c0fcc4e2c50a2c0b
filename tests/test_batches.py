import pytest
import torch

from rlhf_ray.algo.losses import IGNORE_INDEX
from rlhf_ray.formats.parsers import PreferencePair, SFTExample
from rlhf_ray.formats.rows import RowRef
from rlhf_ray.models.optim import warmup_cosine
from rlhf_ray.train.batches import collate_pairs, collate_sft, epoch_batches, tokenize_pairs, tokenize_sft

pytestmark = pytest.mark.unit


def test_epoch_batches_partition_rows_across_workers():
    per_worker = [epoch_batches(10, 2, rank, 2, seed=0, epoch=0) for rank in range(2)]
    assert [len(b) for b in per_worker] == [2, 2]  # 8 of 10 rows used: the ragged 2 are left out
    seen = [i for batches in per_worker for batch in batches for i in batch]
    assert len(seen) == len(set(seen)) == 8
    assert epoch_batches(10, 2, 0, 2, seed=0, epoch=1) != per_worker[0]  # reshuffled each epoch
    assert epoch_batches(10, 2, 0, 2, seed=0, epoch=0) == per_worker[0]  # and reproducible


def test_collate_pads_right_and_masks_labels():
    batch = collate_sft(
        [{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=0
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    pairs = collate_pairs(
        [{"chosen_ids": [1, 2], "rejected_ids": [1]}, {"chosen_ids": [3], "rejected_ids": [3, 4, 5]}], pad_id=0
    )
    assert pairs["input_ids"].tolist() == [[1, 2, 0], [3, 0, 0], [1, 0, 0], [3, 4, 5]]  # chosen rows, then rejected


@pytest.mark.component
def test_tokenized_rows_put_loss_on_the_response_only(tiny_tokenizer):
    prompt = [{"role": "user", "content": "Name a fruit."}]
    (row,) = tokenize_sft([SFTExample(prompt, "An apple.", RowRef("f", 1))], tiny_tokenizer, 256, "error").rows
    scored = [t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX]
    assert tiny_tokenizer.decode(scored) == "An apple.<|im_end|>\n"
    (pair,) = tokenize_pairs(
        [PreferencePair(prompt, "An apple.", "A chair.", RowRef("f", 1))], tiny_tokenizer, 256, "error"
    ).rows
    assert tiny_tokenizer.decode(pair["chosen_ids"]).endswith("An apple.<|im_end|>\n")
    assert tiny_tokenizer.decode(pair["rejected_ids"]).endswith("A chair.<|im_end|>\n")


def test_warmup_cosine_schedule():
    factor = warmup_cosine(total_steps=10, warmup_ratio=0.2)
    assert [round(factor(s), 4) for s in (0, 1)] == [round(1 / 3, 4), round(2 / 3, 4)]  # linear warmup over 2 steps
    assert factor(2) == pytest.approx(1.0) and factor(10) == pytest.approx(0.0)
    assert factor(6) == pytest.approx(0.5)  # halfway through the cosine
    assert torch.tensor([factor(s) for s in range(2, 11)]).diff().le(0).all()


def test_length_chunks_sort_by_length_and_keep_every_row():
    from rlhf_ray.train.batches import length_chunks

    assert length_chunks([5, 1, 9, 3, 7], 2) == [[1, 3], [0, 4], [2]]
    assert length_chunks([5, 1, 9], 0) == [[0, 1, 2]]  # 0: one pass in the original order
    assert length_chunks([5, 1, 9], 3) == [[0, 1, 2]]


def test_pair_chunks_keep_each_pair_together():
    from rlhf_ray.train.batches import collate_pair_chunks

    rows = [
        {"chosen_ids": [1] * 6, "rejected_ids": [2]},
        {"chosen_ids": [3], "rejected_ids": [4, 4]},
        {"chosen_ids": [5] * 5, "rejected_ids": [6] * 5},
    ]
    chunks = collate_pair_chunks(rows, pad_id=0, chunk_size=2)
    assert [tuple(c["input_ids"].shape) for c in chunks] == [(4, 5), (2, 6)]  # pairs 1 and 2 share a width of 5
    assert chunks[0]["input_ids"][:, 0].tolist() == [3, 5, 4, 6]  # chosen of the chunk's pairs first, then rejected
