"""Generate data/demo/arithmetic.jsonl: one-digit additions and subtractions with a reference `answer`.

The prompt set of configs/grpo-arithmetic.yaml, where the reward is a rule checked against the answer
(`rlhf_ray.rewards.examples:exact_answer`), not a trained reward model. Made by the rlhf-ray authors
for this project (Apache-2.0); fixed seed, byte-for-byte reproducible.

Usage: python data/make_arithmetic.py
"""

import json
import random
from pathlib import Path

SEED = 2024
OUT = Path(__file__).resolve().parent / "demo" / "arithmetic.jsonl"


def questions() -> list[dict]:
    """Every sum of two digits 1-9, and every difference of two such digits that is not negative."""
    rows = []
    for a in range(1, 10):
        for b in range(1, 10):
            rows.append({"prompt": f"What is {a} + {b}? Reply with the number only.", "answer": str(a + b)})
            if a >= b:
                rows.append({"prompt": f"What is {a} - {b}? Reply with the number only.", "answer": str(a - b)})
    return rows


def main():
    rows = questions()
    random.Random(SEED).shuffle(rows)
    with open(OUT, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"wrote {len(rows)} rows to {OUT}")


if __name__ == "__main__":
    main()
