import pytest

from rlhf_ray.formats.rows import DataError, RowRef
from rlhf_ray.tokenization import LengthReport, fit_length, prompt_ids, response_ids

pytestmark = pytest.mark.component
REF = RowRef("f.jsonl", 7)


def test_response_ids_follow_the_prompt(tiny_tokenizer):
    prompt = [{"role": "user", "content": "Give me one tip about tea."}]
    p = prompt_ids(tiny_tokenizer, prompt)
    r = response_ids(tiny_tokenizer, prompt, "Use fresh water.", p)
    full = tiny_tokenizer.apply_chat_template(
        [*prompt, {"role": "assistant", "content": "Use fresh water."}], tokenize=False
    )
    assert tiny_tokenizer.decode(p + r) == full
    assert tiny_tokenizer.decode(r) == "Use fresh water.<|im_end|>\n"  # the end-of-turn tokens belong to the response


@pytest.mark.parametrize(
    "policy, expected, counts",
    [
        ("skip", None, {"skipped": 1}),
        ("truncate_prompt", [4, 5, 6], {"truncated": 1}),
    ],
)
def test_over_length_policies_are_counted(policy, expected, counts):
    report = LengthReport(policy)
    assert fit_length([1, 2], [[9, 9]], max_length=8, report=report, ref=REF) == [1, 2]  # fits: untouched
    assert fit_length([1, 2, 3, 4, 5, 6], [[9] * 5, [9] * 3], max_length=8, report=report, ref=REF) == expected
    assert dict(report.counts) == counts and report.seen == 2
    assert policy in report.summary()


def test_over_length_error_names_row():
    with pytest.raises(DataError, match=r"f\.jsonl:7: field '<length>': prompt 6 \+ response 5 tokens > max_length 8"):
        fit_length([0] * 6, [[9] * 5], max_length=8, report=LengthReport("error"), ref=REF)


def test_truncate_prompt_skips_when_response_alone_is_too_long():
    report = LengthReport("truncate_prompt")
    assert fit_length([1, 2], [[9] * 8], max_length=8, report=report, ref=REF) is None
    assert dict(report.counts) == {"skipped": 1}
