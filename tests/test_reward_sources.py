"""Reward functions and HTTP reward servers: results checked row by row, failures named; a real server on 127.0.0.1."""

import math

import pytest

from rlhf_ray.rewards import examples
from rlhf_ray.rewards.checks import RewardError
from rlhf_ray.rewards.function import call_function, load_function
from rlhf_ray.rewards.http import score_over_http, with_retries
from rlhf_ray.wire import PromptRow
from tests.reward_server import RewardServer

pytestmark = pytest.mark.unit

ROWS = [PromptRow("What is 2+3?", {"answer": "5"}, "q.jsonl:1"), PromptRow("What is 4+4?", {"answer": 8}, "q.jsonl:2")]


def test_a_function_is_called_per_row_with_prompt_response_and_fields():
    seen = []

    def reward(prompt, response, fields):
        seen.append((prompt, response, fields))
        return len(response) > 3  # a bool counts as 0 / 1

    assert call_function(reward, "t:reward", ROWS, ["It is 5", "8"], batched=False).tolist() == [1.0, 0.0]
    assert seen == [("What is 2+3?", "It is 5", {"answer": "5"}), ("What is 4+4?", "8", {"answer": 8})]


@pytest.mark.parametrize(
    ("reward", "message"),
    [
        (
            lambda p, r, f: 1 / 0,
            r"reward function t:bad raised ZeroDivisionError: division by zero on row 0 .*q.jsonl:1",
        ),
        (lambda p, r, f: math.nan if f["answer"] == 8 else 1.0, r"t:bad returned nan for row 1 .*q.jsonl:2.*finite"),
        (lambda p, r, f: "high", r"t:bad returned 'high' \(str\) for row 0 .*q.jsonl:1.*expected a number"),
        (lambda p, r, f: None, r"t:bad returned None \(NoneType\) for row 0"),
    ],
)
def test_a_function_that_raises_or_returns_no_finite_number_is_named_with_the_row(reward, message):
    with pytest.raises(RewardError, match=message):
        call_function(reward, "t:bad", ROWS, ["a", "b"], batched=False)


def test_a_batched_function_gets_lists_and_must_return_one_reward_per_response():
    def batch_reward(prompts, responses, fields):
        return [float(f["answer"]) for f in fields]

    assert call_function(batch_reward, "t:batch", ROWS, ["a", "b"], batched=True).tolist() == [5.0, 8.0]
    with pytest.raises(RewardError, match="t:short returned 1 rewards for 2 responses"):
        call_function(lambda p, r, f: [1.0], "t:short", ROWS, ["a", "b"], batched=True)
    with pytest.raises(RewardError, match="t:scalar returned float; expected a list of 2 numbers"):
        call_function(lambda p, r, f: 1.0, "t:scalar", ROWS, ["a", "b"], batched=True)
    with pytest.raises(RewardError, match=r"t:inf returned inf for row 1 of the batch \(q.jsonl:2\)"):
        call_function(lambda p, r, f: [1.0, math.inf], "t:inf", ROWS, ["a", "b"], batched=True)


def test_functions_load_from_a_module_or_a_file(tmp_path):
    assert load_function("rlhf_ray.rewards.examples:one_word") is examples.one_word
    source = tmp_path / "my_reward.py"
    source.write_text("def shout(prompt, response, fields):\n    return response.isupper()\n")
    assert load_function(f"{source}:shout")("p", "HI", {}) is True
    with pytest.raises(RewardError, match="cannot import no_such_module: ModuleNotFoundError"):
        load_function("no_such_module:f")
    with pytest.raises(RewardError, match="cannot import .*missing.py: FileNotFoundError"):
        load_function(f"{tmp_path / 'missing.py'}:f")
    with pytest.raises(RewardError, match="rlhf_ray.rewards.examples has no callable 'nothing'"):
        load_function("rlhf_ray.rewards.examples:nothing")
    with pytest.raises(ValueError, match="expected 'package.module:function'"):
        load_function("rlhf_ray.rewards.examples")


def test_the_example_verifiers():
    assert examples.exact_answer("q", "2 + 3 = 5.", {"answer": "5"}) == 1.0
    assert examples.exact_answer("q", "It is 1,000", {"answer": 1000}) == 1.0
    assert examples.exact_answer("q", "5 or 6", {"answer": 5}) == 0.0  # the last number counts
    assert examples.exact_answer("q", "no idea", {"answer": 5}) == 0.0
    with pytest.raises(KeyError, match="no 'answer' field"):
        examples.exact_answer("q", "5", {})
    assert examples.one_word("q", "Paris.", {}) == 1.0 and examples.one_word("q", "It is Paris", {}) == 0.0
    assert examples.brevity("q", "a b c", {}) == 0.25


@pytest.fixture()
def serve():
    servers = []

    def start(reply, **kwargs):
        servers.append(RewardServer(reply, **kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def lengths(payload):
    return {"rewards": [len(r) for r in payload["responses"]]}


def test_a_server_gets_prompts_responses_and_fields_and_its_rewards_are_used(serve):
    server = serve(lengths)
    rewards = score_over_http(server.url, ROWS, ["abc", "de"], timeout_s=5, max_retries=0, backoff_s=0)
    assert rewards.tolist() == [3.0, 2.0]
    assert server.requests == [
        {
            "prompts": ["What is 2+3?", "What is 4+4?"],
            "responses": ["abc", "de"],
            "fields": [{"answer": "5"}, {"answer": 8}],
        }
    ]


def test_a_failing_server_is_retried_with_backoff_until_it_answers(serve):
    server = serve(lengths, failures=2)
    rewards = score_over_http(server.url, ROWS, ["abc", "de"], timeout_s=5, max_retries=2, backoff_s=0.01)
    assert rewards.tolist() == [3.0, 2.0] and len(server.requests) == 3


def test_a_server_that_keeps_failing_or_is_down_stops_with_its_address(serve):
    server = serve(lengths, failures=10)
    with pytest.raises(RewardError, match=r"did not answer after 3 attempts .*max_retries=2.*HTTP 503.*not now"):
        score_over_http(server.url, ROWS, ["a", "b"], timeout_s=5, max_retries=2, backoff_s=0.01)
    url = server.url
    server.close()
    with pytest.raises(RewardError, match=f"reward server {url} did not answer after 2 attempts.*URLError"):
        score_over_http(url, ROWS, ["a", "b"], timeout_s=5, max_retries=1, backoff_s=0.01)


def test_a_client_error_is_not_retried_and_a_bad_answer_is_named(serve):
    server = serve(lengths, failures=10, status=400)
    with pytest.raises(RewardError, match="refused the request: HTTP 400"):
        score_over_http(server.url, ROWS, ["a", "b"], timeout_s=5, max_retries=3, backoff_s=0.01)
    assert len(server.requests) == 1
    wrong_count = serve(lambda payload: {"rewards": [1.0]})
    with pytest.raises(RewardError, match="returned 1 rewards for 2 responses"):
        score_over_http(wrong_count.url, ROWS, ["a", "b"], timeout_s=5, max_retries=0, backoff_s=0)
    no_list = serve(lambda payload: {"scores": [1.0, 2.0]})
    with pytest.raises(RewardError, match=r"without a 'rewards' list \(got \['scores'\]\)"):
        score_over_http(no_list.url, ROWS, ["a", "b"], timeout_s=5, max_retries=0, backoff_s=0)


def test_backoff_doubles_between_attempts():
    waits, calls = [], []

    def attempt():
        calls.append(1)
        raise TimeoutError("slow")

    with pytest.raises(RewardError, match="after 4 attempts.*TimeoutError: slow"):
        with_retries(attempt, "http://x", max_retries=3, backoff_s=0.5, sleep=waits.append)
    assert waits == [0.5, 1.0, 2.0] and len(calls) == 4
