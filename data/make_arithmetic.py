"""Generate data/demo/arithmetic.jsonl: addition and subtraction prompts with a reference `answer`.

The prompt set of configs/grpo-arithmetic.yaml, where the reward is a rule checked against the answer
(`rlhf_ray.rewards.examples:exact_answer`), not a trained reward model. Made by the rlhf-ray authors
for this project (Apache-2.0); fixed seed, byte-for-byte reproducible.

Usage: python data/make_arithmetic.py
"""

import json
import random
from pathlib import Path

SEED = 2024
N_ROWS = 300
OUT = Path(__file__).resolve().parent / "demo" / "arithmetic.jsonl"


def question(rng: random.Random) -> dict:
    a, b = rng.randint(10, 60), rng.randint(2, 40)
    if rng.random() < 0.5:
        return {"prompt": f"What is {a} + {b}? Reply with the number only.", "answer": str(a + b)}
    a, b = max(a, b), min(a, b)
    return {"prompt": f"What is {a} - {b}? Reply with the number only.", "answer": str(a - b)}


def main():
    rng = random.Random(SEED)
    rows, seen = [], set()
    while len(rows) < N_ROWS:
        row = question(rng)
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
    with open(OUT, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"wrote {len(rows)} rows to {OUT}")


if __name__ == "__main__":
    main()
