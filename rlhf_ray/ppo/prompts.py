"""PPO prompts: tokenized once, served in a seeded order that depends only on the iteration number."""

from __future__ import annotations

import random
from dataclasses import dataclass

from rlhf_ray.config import Config
from rlhf_ray.formats import splits
from rlhf_ray.formats.load import load_prompts
from rlhf_ray.formats.parsers import PromptExample
from rlhf_ray.formats.splits import SplitOrAll
from rlhf_ray.tokenization import LengthReport, fit_length, over_length_untokenized, prompt_ids
from rlhf_ray.wire import PromptRow


@dataclass
class PromptSet:
    examples: list[PromptExample]
    token_ids: list[list[int]]
    summary: str

    def row(self, index: int) -> PromptRow:
        """What reward functions see of prompt `index`: its last message's text and the row's extra fields."""
        example = self.examples[index]
        return PromptRow(example.prompt[-1]["content"], example.fields, str(example.ref))

    def batch(self, iteration: int, size: int, seed: int) -> list[int]:
        """Prompt indices of `iteration`: a stream of per-epoch seeded permutations, cut into batches."""
        n = len(self.token_ids)
        indices = []
        for position in range(iteration * size, (iteration + 1) * size):
            epoch, offset = divmod(position, n)
            order = list(range(n))
            random.Random(seed * 1_000_003 + epoch).shuffle(order)
            indices.append(order[offset])
        return indices


def load_prompt_set(config: Config, tokenizer, split: SplitOrAll = "train") -> PromptSet:
    """Read `data.prompts`, keep one split of it (`formats/splits.py`: PPO trains on `train`, never on the
    `eval` or `test` prompts), apply the chat template and the over-length policy at `data.max_prompt_length`."""
    data = config.data
    source = data.prompts
    loaded = load_prompts(
        source.path, source.format, on_bad_row=data.on_bad_row, split=source.split, limit=source.limit
    )
    wanted = {
        id(example)
        for example in splits.select(
            loaded.examples,
            split,
            seed=data.seed,
            eval_fraction=data.eval_fraction,
            test_fraction=data.test_fraction,
            train_part=data.train_part,
        )
    }
    report = LengthReport(data.overlong)
    examples, token_ids = [], []
    for example in loaded.examples:  # every prompt is checked, also those of other splits
        texts = [m["content"] for m in example.prompt]
        if over_length_untokenized(
            texts, tokenizer, data.max_prompt_length, "data.max_prompt_length", report, example.ref
        ):
            continue
        ids = fit_length(prompt_ids(tokenizer, example.prompt), [[]], data.max_prompt_length, report, example.ref)
        if ids is not None and id(example) in wanted:
            examples.append(example)
            token_ids.append(ids)
    if not token_ids:
        raise ValueError(
            f"{source.path}: no {split!r} prompts left after the held-out split and the length policy "
            f"({len(loaded.examples)} read, {len(wanted)} in the {split!r} split; {report.summary()})"
        )
    summary = (
        f"{source.path} ({loaded.format}): {loaded.rows_read} rows read, {len(wanted)} of "
        f"{len(loaded.examples)} prompts in the {split!r} split, {len(token_ids)} used; "
        f"bad rows: {loaded.problems.summary()}; lengths: {report.summary()}"
    )
    return PromptSet(examples, token_ids, summary)
