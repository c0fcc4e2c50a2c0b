"""Rewards from a remote HTTP server (`ppo.rewards[].url`).

One POST per batch, JSON both ways:
  request  {"prompts": [str, ...], "responses": [str, ...], "fields": [{...}, ...]}
  response {"rewards": [number, ...]}   (one per response, in order)
A connection error, a timeout or a 5xx status is retried with exponential backoff; a 4xx status
is not (the request itself is wrong). After the last attempt the run stops with the server's address
and the last error.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import torch

from rlhf_ray.rewards.checks import RewardError, checked_rewards
from rlhf_ray.wire import PromptRow


def post_json(url: str, payload: dict, timeout_s: float) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.loads(response.read())


def retryable(err: Exception) -> bool:
    """Worth another attempt: the server was unreachable, slow, or failed on its side (5xx)."""
    if isinstance(err, urllib.error.HTTPError):
        return err.code >= 500
    return isinstance(err, (urllib.error.URLError, TimeoutError, ConnectionError))


def describe(err: Exception) -> str:
    if isinstance(err, urllib.error.HTTPError):
        body = err.read()[:200].decode(errors="replace") if err.fp else ""
        return f"HTTP {err.code} {err.reason}" + (f": {body}" if body else "")
    return f"{type(err).__name__}: {getattr(err, 'reason', err)}"


def with_retries(
    attempt: Callable[[], dict], url: str, max_retries: int, backoff_s: float, sleep: Callable = time.sleep
) -> dict:
    """`attempt()`, again after backoff_s, 2 * backoff_s, ... while it fails in a retryable way."""
    for tries in range(max_retries + 1):
        try:
            return attempt()
        except Exception as err:
            if not retryable(err):
                raise RewardError(f"reward server {url} refused the request: {describe(err)}") from err
            if tries == max_retries:
                raise RewardError(
                    f"reward server {url} did not answer after {max_retries + 1} attempts "
                    f"(ppo.rewards[].max_retries={max_retries}): {describe(err)}"
                ) from err
            sleep(backoff_s * 2**tries)
    raise AssertionError("unreachable")


def score_over_http(
    url: str, rows: list[PromptRow], responses: list[str], *, timeout_s: float, max_retries: int, backoff_s: float
) -> torch.Tensor:
    """(B,) rewards from the server at `url`, checked like a function's."""
    payload = {"prompts": [r.text for r in rows], "responses": responses, "fields": [dict(r.fields) for r in rows]}
    answer = with_retries(lambda: post_json(url, payload, timeout_s), url, max_retries, backoff_s)
    if not isinstance(answer, dict) or "rewards" not in answer:
        keys = sorted(answer) if isinstance(answer, dict) else type(answer).__name__
        raise RewardError(f"reward server {url} answered without a 'rewards' list (got {keys})")
    return checked_rewards(answer["rewards"], f"reward server {url}", rows)
