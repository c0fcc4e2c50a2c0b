import gzip
import json

import pytest

from rlhf_ray.formats.load import detect_format, load_examples, load_preference_pairs, load_prompts, load_sft_examples
from rlhf_ray.formats.names import FORMATS, FORMATS_OF_KIND, KIND_OF_FORMAT
from rlhf_ray.formats.rows import DataError, RowRef
from tests.conftest import shared_file

pytestmark = pytest.mark.unit

H, A = "\n\nHuman: ", "\n\nAssistant: "
GOOD_HH = {"chosen": f"{H}Hi there{A}Hello! How can I help?", "rejected": f"{H}Hi there{A}Go away."}


def write_jsonl(path, rows):
    """Rows are dicts (dumped as JSON) or raw strings (written as is)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_hh_rlhf_split_into_prompt_and_responses(tmp_path):
    row = {
        "chosen": f"{H}What is 2+2?{A}It is 4.{H}And 3+3?{A}It is 6.",
        "rejected": f"{H}What is 2+2?{A}It is 4.{H}And 3+3?{A}No idea.",
    }
    loaded = load_preference_pairs(str(write_jsonl(tmp_path / "p.jsonl", [row])), "hh-rlhf")
    (pair,) = loaded.examples
    assert pair.prompt == [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "It is 4."},
        {"role": "user", "content": "And 3+3?"},
    ]
    assert (pair.chosen, pair.rejected) == ("It is 6.", "No idea.")
    assert str(pair.ref).endswith("p.jsonl:1")


def test_consecutive_human_turns_are_joined(tmp_path):
    row = {"chosen": f"{H}one{H}two{A}yes", "rejected": f"{H}one{H}two{A}no"}
    (pair,) = load_preference_pairs(str(write_jsonl(tmp_path / "p.jsonl", [row])), "hh-rlhf").examples
    assert pair.prompt == [{"role": "user", "content": "one\n\ntwo"}]


BAD_HH = [
    ("not json", "<json>", "not valid JSON"),
    ({"chosen": GOOD_HH["chosen"]}, "rejected", "missing"),
    ({"chosen": 3, "rejected": GOOD_HH["rejected"]}, "chosen", "expected a string, got int"),
    (
        {"chosen": f"{H}Hi there", "rejected": GOOD_HH["rejected"]},
        "chosen",
        "does not end with an '\\n\\nAssistant:' turn",
    ),
    ({"chosen": "no turns at all", "rejected": GOOD_HH["rejected"]}, "chosen", "text before the first"),
    ({"chosen": GOOD_HH["chosen"], "rejected": GOOD_HH["chosen"]}, "rejected", "identical to 'chosen'"),
    ({"chosen": GOOD_HH["chosen"], "rejected": f"{H}Something else{A}Go away."}, "rejected", "no shared prompt"),
    ({"chosen": f"{H}Hi there{A}  ", "rejected": GOOD_HH["rejected"]}, "chosen", "final Assistant response is empty"),
    ([1, 2], "<json>", "expected a JSON object"),
]


@pytest.mark.parametrize("bad, field, problem", BAD_HH, ids=[b[2][:30] for b in BAD_HH])
def test_bad_hh_rows_name_file_line_and_field(tmp_path, bad, field, problem):
    path = write_jsonl(tmp_path / "hh.jsonl", [GOOD_HH, GOOD_HH, bad, GOOD_HH])
    with pytest.raises(DataError) as err:
        load_preference_pairs(str(path), "hh-rlhf")
    assert f"{path}:3: field '{field}'" in str(err.value)
    assert problem in str(err.value)
    # under `skip` the row is dropped and counted, the rest kept
    loaded = load_preference_pairs(str(path), "hh-rlhf", on_bad_row="skip")
    assert len(loaded.examples) == 3 and loaded.rows_read == 4
    assert loaded.problems.total == 1 and f"{path}:3" in loaded.problems.summary()


GOOD_PAIR = {"prompt": "Name a fruit.", "chosen": "An apple.", "rejected": "A chair."}
BAD_PAIRS = [
    ({"prompt": "Name a fruit.", "chosen": "An apple."}, "rejected", "missing"),
    ({**GOOD_PAIR, "chosen": ""}, "chosen", "is empty"),
    ({**GOOD_PAIR, "rejected": "An apple."}, "rejected", "identical to 'chosen'"),
    ({**GOOD_PAIR, "prompt": [{"role": "user"}]}, "prompt[0]", "exactly 'role' and 'content'"),
    ({**GOOD_PAIR, "prompt": [{"role": "robot", "content": "x"}]}, "prompt[0].role", "must be one of"),
    (
        {**GOOD_PAIR, "chosen": [{"role": "user", "content": "An apple."}]},
        "chosen",
        "last message must be the assistant",
    ),
    (
        {**GOOD_PAIR, "chosen": [{"role": "user", "content": "Other?"}, {"role": "assistant", "content": "x"}]},
        "chosen",
        "differ from 'prompt'",
    ),
    ({**GOOD_PAIR, "prompt": 7}, "prompt", "expected a non-empty list of chat messages"),
]


@pytest.mark.parametrize("bad, field, problem", BAD_PAIRS, ids=[b[2][:30] for b in BAD_PAIRS])
def test_bad_split_pairs(tmp_path, bad, field, problem):
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD_PAIR, bad])
    with pytest.raises(
        DataError,
        match=rf"pairs\.jsonl:2: field '{__import__('re').escape(field)}'.*{__import__('re').escape(problem)}",
    ):
        load_preference_pairs(str(path), "pairs")


def test_pairs_as_chat_messages(tmp_path):
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."}]
    row = {
        "prompt": prompt,
        "chosen": [*prompt, {"role": "assistant", "content": "Apple."}],
        "rejected": [{"role": "assistant", "content": "Chair."}],
    }
    (pair,) = load_preference_pairs(str(write_jsonl(tmp_path / "m.jsonl", [row]))).examples
    assert pair.prompt == prompt and (pair.chosen, pair.rejected) == ("Apple.", "Chair.")


def test_self_instruct_one_example_per_instance(tmp_path):
    row = {
        "instruction": "Translate to French.",
        "instances": [{"input": "cat", "output": "chat"}, {"input": "", "output": "Give me a word."}],
    }
    loaded = load_sft_examples(str(write_jsonl(tmp_path / "s.jsonl", [row])))
    assert loaded.format == "self-instruct"
    first, second = loaded.examples
    assert first.prompt == [{"role": "user", "content": "Translate to French.\n\ncat"}] and first.response == "chat"
    assert second.prompt == [{"role": "user", "content": "Translate to French."}]


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"instruction": "x", "instances": []}, "instances"),
        ({"instruction": "x", "instances": [{"input": "a"}]}, "instances[0].output"),
        ({"instruction": "x", "instances": [{"input": 5, "output": "y"}]}, "instances[0].input"),
        ({"instruction": "", "instances": [{"input": "", "output": "y"}]}, "instruction"),
        ({"instruction": "x", "instances": [{"input": "", "output": " "}]}, "instances[0].output"),
    ],
)
def test_bad_self_instruct(tmp_path, bad, field):
    good = {"instruction": "x", "instances": [{"input": "", "output": "y"}]}
    path = write_jsonl(tmp_path / "s.jsonl", [good, bad])
    with pytest.raises(DataError, match=rf"s\.jsonl:2: field '{__import__('re').escape(field)}'"):
        load_sft_examples(str(path), "self-instruct")


def test_prompt_completion_and_prompts(tmp_path):
    sft = load_sft_examples(str(write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Hi", "completion": "Hello"}])))
    assert sft.format == "prompt-completion" and sft.examples[0].response == "Hello"
    prompts = load_prompts(
        str(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi"}, {"prompt": [{"role": "user", "content": "Yo"}]}]))
    )
    assert [p.prompt[0]["content"] for p in prompts.examples] == ["Hi", "Yo"]
    from_pairs = load_prompts(str(write_jsonl(tmp_path / "hh.jsonl", [GOOD_HH])), "hh-rlhf")
    assert from_pairs.examples[0].prompt == [{"role": "user", "content": "Hi there"}]
    with pytest.raises(DataError, match=r"p2\.jsonl:1: field 'prompt'.*must not end with an assistant"):
        load_prompts(str(write_jsonl(tmp_path / "p2.jsonl", [{"prompt": [{"role": "assistant", "content": "x"}]}])))


def test_a_prompt_rows_other_fields_are_kept_for_reward_functions(tmp_path, tiny_tokenizer):
    from rlhf_ray.data_inspect import inspect_source

    rows = [{"prompt": "What is 2+3?", "answer": "5"}, {"prompt": "Hi"}, {"prompt": "4+4?", "answer": 8, "level": 2}]
    path = write_jsonl(tmp_path / "q.jsonl", rows)
    loaded = load_prompts(str(path))
    assert loaded.format == "prompts"
    assert [ex.fields for ex in loaded.examples] == [{"answer": "5"}, {}, {"answer": 8, "level": 2}]
    report = inspect_source(str(path), "auto", tiny_tokenizer)
    assert "extra fields (reach reward functions): answer (2 rows), level (1 rows)" in report
    assert 'q.jsonl:1: {"answer": "5"}' in report


def test_gz_files_folders_and_limit(tmp_path):
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    write_jsonl(folder / "a.jsonl", [GOOD_PAIR] * 3)
    with gzip.open(folder / "sub" / "b.jsonl.gz", "wt") as handle:
        handle.write(json.dumps(GOOD_PAIR) + "\n\n" + json.dumps(GOOD_PAIR) + "\n")
    (folder / "notes.txt").write_text("ignored")
    assert len(load_preference_pairs(str(folder)).examples) == 5
    assert len(load_preference_pairs(str(folder), limit=2).examples) == 2
    gz_refs = [str(p.ref) for p in load_preference_pairs(str(folder / "sub" / "b.jsonl.gz")).examples]
    assert gz_refs[1].endswith("b.jsonl.gz:3")  # blank lines keep their numbers


@pytest.mark.parametrize(
    "make, pattern",
    [
        (lambda d: write_jsonl(d / "empty.jsonl", []), r"no valid preference rows \(0 read"),
        (lambda d: d / "missing.jsonl", r"no such file or folder"),
        (lambda d: (d / "x.csv").write_text("a,b") and d / "x.csv", r"unsupported file type"),
        (lambda d: (d / "empty_dir").mkdir() or d / "empty_dir", r"holds no \.jsonl"),
        (
            lambda d: write_jsonl(d / "p.jsonl", [{"prompt": "x"}]),
            r"p\.jsonl:1: field '<format>': looks like 'prompts' rows",
        ),
        (
            lambda d: write_jsonl(d / "q.jsonl", [{"question": "x"}]),
            r"q\.jsonl:1: field '<format>': cannot tell the format",
        ),
    ],
)
def test_bad_sources(tmp_path, make, pattern):
    with pytest.raises(DataError, match=pattern):
        load_preference_pairs(str(make(tmp_path)))


def test_wrong_format_for_kind(tmp_path):
    with pytest.raises(DataError, match=r"preference data cannot be read from format 'prompts'"):
        load_preference_pairs(str(write_jsonl(tmp_path / "p.jsonl", [GOOD_PAIR])), "prompts")


ONE_ROW_OF = {
    "hh-rlhf": GOOD_HH,
    "pairs": {"prompt": "Hi", "chosen": "Hello", "rejected": "Go."},
    "self-instruct": {"instruction": "Greet.", "instances": [{"input": "", "output": "Hello"}]},
    "prompt-completion": {"prompt": "Hi", "completion": "Hello"},
    "prompts": {"prompt": "Hi"},
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_is_read_as_exactly_the_kinds_it_is_listed_for(tmp_path, fmt):
    path = str(write_jsonl(tmp_path / "one.jsonl", [ONE_ROW_OF[fmt]]))
    assert KIND_OF_FORMAT[fmt] in {kind for kind, formats in FORMATS_OF_KIND.items() if fmt in formats}
    assert detect_format(ONE_ROW_OF[fmt], RowRef(path, 1)) == fmt
    for kind, formats in FORMATS_OF_KIND.items():
        if fmt in formats:
            assert len(load_examples(kind, path, fmt).examples) == 1
        else:
            with pytest.raises(DataError, match=f"{kind} data cannot be read from format '{fmt}'"):
                load_examples(kind, path, fmt)


def test_hub_dataset_path(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return [GOOD_PAIR, {**GOOD_PAIR, "rejected": "An apple."}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(DataError, match=r"hf:someone/pairs\[test\]:2: field 'rejected'"):
        load_preference_pairs("someone/pairs", split="test")
    assert calls == [("someone/pairs", "test")]

    def unreachable(name, split):
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(
        DataError, match=r"Anthropic/hh-rlhf: .*loading it from the Hugging Face hub failed: hub unreachable"
    ):
        load_preference_pairs("Anthropic/hh-rlhf")


def test_real_hh_rlhf_online_split():
    path = shared_file("hh-rlhf/helpful-online/test.jsonl.gz")
    with pytest.raises(DataError, match=r"test\.jsonl\.gz:\d+: field 'rejected': identical to 'chosen'"):
        load_preference_pairs(str(path), "hh-rlhf")
    loaded = load_preference_pairs(str(path), "hh-rlhf", on_bad_row="skip")
    assert loaded.rows_read == 1137
    counts = loaded.problems.counts
    # Measured on this file: 2 rows with chosen == rejected (as its README says), and 6 more that are
    # malformed: 3 empty final replies, 2 rejected transcripts ending on a Human turn, 1 empty earlier turn.
    assert counts["rejected: identical to 'chosen'"] == 2
    assert counts["rejected: the final Assistant response is empty"] == 3
    assert counts["rejected: does not end with an '\\n\\nAssistant:' turn"] == 2
    assert len(loaded.examples) == 1137 - 8 and loaded.problems.total == 8


def test_real_hh_rlhf_rejection_sampled_quirks():
    path = shared_file("hh-rlhf/helpful-rejection-sampled/test.jsonl.gz")
    loaded = load_preference_pairs(str(path), "hh-rlhf", on_bad_row="skip")
    assert loaded.rows_read == 2749
    counts = loaded.problems.counts
    assert sum(n for k, n in counts.items() if "identical" in k) == 32
    assert sum(n for k, n in counts.items() if "no shared prompt" in k) == 3, counts


def test_real_self_instruct():
    loaded = load_sft_examples(str(shared_file("self-instruct/seed_tasks.jsonl")), "self-instruct")
    assert loaded.rows_read == 175 and len(loaded.examples) >= 175 and loaded.problems.total == 0


def test_a_typo_in_a_relative_local_path_is_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    """`data/pairz` looks like a hub name `owner/name`; since `data/` is a local folder it is a local typo,
    refused at once (the hub client would retry for about 25 s on a machine without the hub)."""
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("rlhf_ray.formats.sources._hub_rows", lambda name, split: pytest.fail("asked the hub"))
    with pytest.raises(DataError, match=f"data/pairz: no such file or folder in {tmp_path}/data"):
        load_preference_pairs("data/pairz")


def test_a_mixed_format_folder_says_which_file_fixed_the_format(tmp_path):
    """`format: auto` reads the format from the first row; a valid hh-rlhf file read later as pairs says so."""
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": "Hi", "chosen": "Hello.", "rejected": "Go."}])
    write_jsonl(tmp_path / "b.jsonl", [{"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.", "rejected": "x"}])
    with pytest.raises(DataError) as refused:
        load_preference_pairs(str(tmp_path))
    said = str(refused.value)
    assert said.startswith(f"{tmp_path}/b.jsonl:1: field 'prompt'")
    assert f"read as 'pairs' rows: `format: auto` took the format from {tmp_path}/a.jsonl:1" in said
