import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_ray.formats.load import load_preference_pairs, load_prompts, load_sft_examples

pytestmark = pytest.mark.unit
DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"


def test_demo_files_load_cleanly():
    assert len(load_sft_examples(str(DEMO / "sft.jsonl")).examples) == 300
    assert len(load_preference_pairs(str(DEMO / "pairs.jsonl")).examples) == 400
    prompts = load_prompts(str(DEMO / "prompts.jsonl")).examples
    pair_prompts = {p.prompt[0]["content"] for p in load_preference_pairs(str(DEMO / "pairs.jsonl")).examples}
    assert len(prompts) == 200 and not pair_prompts & {p.prompt[0]["content"] for p in prompts}  # held out


def test_arithmetic_prompts_carry_their_answers():
    from rlhf_ray.rewards.examples import exact_answer

    examples = load_prompts(str(DEMO / "arithmetic.jsonl")).examples
    assert len(examples) == 81 + 45 and all(set(ex.fields) == {"answer"} for ex in examples)
    for ex in examples[:20]:
        a, op, b = ex.prompt[0]["content"].removeprefix("What is ").split("?")[0].split()
        result = int(a) + int(b) if op == "+" else int(a) - int(b)
        assert exact_answer("", f"It is {result}.", ex.fields) == 1.0


@pytest.mark.parametrize("script", ["make_demo.py", "make_arithmetic.py"])
def test_generator_reproduces_the_committed_files(script):
    script = DEMO.parent / script
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in DEMO.glob("*.jsonl")}
    subprocess.run([sys.executable, str(script)], check=True, capture_output=True)
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in DEMO.glob("*.jsonl")}
    assert before == after
