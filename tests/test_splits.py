"""Held-out splits by a seeded hash of the prompt (formats/splits.py)."""

import hashlib
import json
from dataclasses import dataclass

import pytest

from rlhf_ray.formats.splits import in_train_part, prompt_numbers, select, split_of

pytestmark = pytest.mark.unit


@dataclass
class Example:
    prompt: list
    tag: str = ""


def user(text: str) -> list:
    return [{"role": "user", "content": text}]


def test_prompt_numbers_are_the_documented_hash():
    key = json.dumps(user("hi"), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    digest = hashlib.sha256(f"7\0{key}".encode()).digest()
    expected = (int.from_bytes(digest[:8], "big") / 2**64, int.from_bytes(digest[8:16], "big") / 2**64)
    assert prompt_numbers(user("hi"), 7) == expected
    assert prompt_numbers(user("hi"), 8) != expected  # the seed matters
    assert all(0 <= x < 1 for x in expected)


def test_split_follows_the_intervals_of_the_draw():
    prompts = [user(f"question {i}") for i in range(2000)]
    for prompt in prompts[:200]:
        draw, _ = prompt_numbers(prompt, 0)
        expected = "test" if draw < 0.1 else "eval" if draw < 0.3 else "train"
        assert split_of(prompt, 0, eval_fraction=0.2, test_fraction=0.1) == expected
    counts = {name: sum(split_of(p, 0, 0.2, 0.1) == name for p in prompts) for name in ("train", "eval", "test")}
    assert 1300 < counts["train"] < 1500 and 330 < counts["eval"] < 470 and 140 < counts["test"] < 260, counts


def test_the_same_prompt_lands_in_the_same_split_whatever_else_is_in_the_file():
    """The guarantee the stages rely on: a prompt's split does not depend on the rows around it or their order."""
    shared = [user(f"shared {i}") for i in range(300)]
    pairs = [Example(p, "pair") for p in shared] + [Example(user(f"pair only {i}")) for i in range(100)]
    prompts = [Example(user(f"prompt only {i}")) for i in range(50)] + [Example(p, "prompt") for p in reversed(shared)]
    for split in ("train", "eval", "test"):
        in_pairs = {
            json.dumps(e.prompt) for e in select(pairs, split, seed=0, eval_fraction=0.2, test_fraction=0.1) if e.tag
        }
        in_prompts = {
            json.dumps(e.prompt) for e in select(prompts, split, seed=0, eval_fraction=0.2, test_fraction=0.1) if e.tag
        }
        assert in_pairs == in_prompts and in_pairs, split
    held_out = {
        json.dumps(e.prompt)
        for s in ("eval", "test")
        for e in select(pairs, s, seed=0, eval_fraction=0.2, test_fraction=0.1)
    }
    trained = {json.dumps(e.prompt) for e in select(prompts, "train", seed=0, eval_fraction=0.2, test_fraction=0.1)}
    assert held_out and not held_out & trained  # PPO prompts never include the RM's held-out prompts


def test_training_halves_are_disjoint_and_cover_the_training_split():
    examples = [Example(user(f"q{i}")) for i in range(1000)]
    kwargs = dict(seed=3, eval_fraction=0.1, test_fraction=0.1)
    whole = select(examples, "train", **kwargs)
    a = select(examples, "train", train_part="a", **kwargs)
    b = select(examples, "train", train_part="b", **kwargs)
    assert {id(e) for e in a} | {id(e) for e in b} == {id(e) for e in whole}
    assert not {id(e) for e in a} & {id(e) for e in b}
    assert 0.4 < len(a) / len(whole) < 0.6
    assert in_train_part(user("x"), 3, "all")
    assert select(examples, "eval", train_part="a", **kwargs) == select(
        examples, "eval", **kwargs
    )  # halves: train only


def test_zero_fractions_keep_everything_for_training():
    examples = [Example(user(f"q{i}")) for i in range(100)]
    assert select(examples, "train", seed=0, eval_fraction=0.0, test_fraction=0.0) == examples
