"""`rlhf-ray eval rm`: pairwise accuracy, margin, calibration and a length baseline of reward models.

The pairs are read and tokenized as the RM job reads them (chat template, `data.max_length`,
`data.overlong`), optionally narrowed to one split by prompt; every model scores every pair, and the
figures are given overall and per source file.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rlhf_ray.algo.evaluation import pairwise_summary
from rlhf_ray.config import Config
from rlhf_ray.formats import splits
from rlhf_ray.formats.load import load_preference_pairs
from rlhf_ray.tokenization import LengthReport
from rlhf_ray.train.batches import tokenize_pairs

ScoreFn = Callable[[list[list[int]], list[list[int]]], list[float]]  # (sequences, responses) -> raw scores


@dataclass
class TokenizedPair:
    chosen_ids: list[int]  # prompt + chosen response, as the RM job tokenizes it
    rejected_ids: list[int]  # the same prompt + rejected response
    source: str  # the file the pair came from


@dataclass
class PairSet:
    pairs: list[TokenizedPair]
    description: str  # what was read, kept and skipped


def load_pair_set(config: Config, data_path: str, fmt: str, split: str, tokenizer) -> PairSet:
    """Preference pairs of `data_path` in `split` ("all", "train", "eval" or "test"), tokenized for scoring
    by the RM job's own `tokenize_pairs`, one source file at a time."""
    data = config.data
    loaded = load_preference_pairs(data_path, fmt, on_bad_row=data.on_bad_row)
    examples = splits.select(
        loaded.examples, split, seed=data.seed, eval_fraction=data.eval_fraction, test_fraction=data.test_fraction
    )
    by_file: dict[str, list] = defaultdict(list)
    for pair in examples:
        by_file[pair.ref.file].append(pair)
    lengths, pairs = LengthReport(data.overlong), []
    for source, group in by_file.items():
        rows = tokenize_pairs(group, tokenizer, data.max_length, data.overlong, lengths).rows
        pairs += [TokenizedPair(row["chosen_ids"], row["rejected_ids"], source) for row in rows]
    if not pairs:
        raise ValueError(
            f"{data_path}: no preference pairs to evaluate in split {split!r} "
            f"({len(loaded.examples)} read, {len(examples)} in the split; {lengths.summary()})"
        )
    description = (
        f"{data_path} ({loaded.format}), split {split!r}: {len(loaded.examples)} pairs read, "
        f"{len(examples)} in the split, {len(pairs)} scored; bad rows: {loaded.problems.summary()}; "
        f"lengths: {lengths.summary()}"
    )
    return PairSet(pairs, description)


def score_pairs(
    score: ScoreFn, pairs: list[TokenizedPair], batch_size: int = 16, progress: str | None = None
) -> list[float]:
    """Margins r(chosen) - r(rejected), scoring whole sequences in batches of similar length."""
    from tqdm import tqdm

    sequences = [ids for pair in pairs for ids in (pair.chosen_ids, pair.rejected_ids)]
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    scores = [0.0] * len(sequences)
    with tqdm(total=len(sequences), desc=progress, disable=progress is None, mininterval=2.0) as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            values = score([sequences[i] for i in batch], [[] for _ in batch])
            for i, value in zip(batch, values):
                scores[i] = float(value)
            bar.update(len(batch))
    return [scores[2 * k] - scores[2 * k + 1] for k in range(len(pairs))]


def summarise(pairs: list[TokenizedPair], margins: list[float]) -> dict:
    """Overall and per-source-file summaries of one model's margins."""
    groups: dict[str, list[int]] = defaultdict(list)
    for index, pair in enumerate(pairs):
        groups[pair.source].append(index)

    def of(indices: list[int]) -> dict:
        # the two sequences of a pair share their prompt, so comparing their lengths compares the responses
        return pairwise_summary(
            [margins[i] for i in indices],
            [len(pairs[i].chosen_ids) for i in indices],
            [len(pairs[i].rejected_ids) for i in indices],
        ).as_dict()

    return {
        "overall": of(list(range(len(pairs)))),
        "per_file": {source: of(ix) for source, ix in sorted(groups.items())},
    }


def markdown_report(results: dict) -> str:
    lines = [
        "# Reward-model evaluation",
        "",
        results["data"],
        "",
        "model | file | pairs | accuracy | ties | mean margin | calibration error (ECE) | longer chosen",
        "--- | --- | --- | --- | --- | --- | --- | ---",
    ]
    for model, result in results["models"].items():
        rows = [("all files", result["overall"])] + list(result["per_file"].items())
        for source, s in rows:
            lines.append(
                f"{model} | {source} | {s['pairs']} | {s['accuracy']:.3f} | {s['ties']} | "
                f"{s['mean_margin']:.3f} | {s['calibration_error']:.3f} | {s['longer_chosen']:.3f}"
            )
    lines += [
        "",
        "accuracy: share of pairs the model scores chosen > rejected. calibration error: expected "
        "calibration error of sigmoid(|margin|) as the confidence of the model's pick (10 bins). "
        "longer chosen: how often the chosen response is the longer one in tokens, the accuracy of a "
        "'pick the longer response' baseline.",
    ]
    return "\n".join(lines) + "\n"


def write_results(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "report.md").write_text(markdown_report(results))
