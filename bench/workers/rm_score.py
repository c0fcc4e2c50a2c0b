"""Held-out pairwise accuracy of a reward model, scored the same way for every system of a suite."""

from __future__ import annotations


def heldout_accuracy(model, rows: list[dict], pad_id: int, batch: int) -> float:
    """Share of held-out pairs with reward(chosen) > reward(rejected), scored like rlhf-ray's eval (right padding)."""
    import torch

    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(rows), batch):
            chunk = rows[start : start + batch]
            seqs = [r["chosen_ids"] for r in chunk] + [r["rejected_ids"] for r in chunk]
            width = max(map(len, seqs))
            ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs])
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
            rewards = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1).float()
            chosen, rejected = rewards.chunk(2)
            correct += int((chosen > rejected).sum())
    return correct / max(len(rows), 1)
