"""Reward actors besides the trained reward model: a Python function, and a remote HTTP server.

Each decodes the responses with the policy's tokenizer and scores them with the prompt rows' text and
extra fields; a failure or an unusable reward raises a RewardError naming the source and the row.
"""

from __future__ import annotations

import torch

from rlhf_ray.models.loading import load_tokenizer
from rlhf_ray.rewards.function import call_function, load_function
from rlhf_ray.rewards.http import score_over_http
from rlhf_ray.wire import PromptRow


class DecodingReward:
    def __init__(self, tokenizer_path: str, trust_remote_code: bool = False):
        self.tokenizer = load_tokenizer(tokenizer_path, trust_remote_code)

    def texts(self, responses: list[list[int]], rows: list[PromptRow] | None) -> list[str]:
        if rows is None or len(rows) != len(responses):
            raise ValueError(f"{type(self).__name__}.score needs one prompt row per response")
        return self.tokenizer.batch_decode(responses, skip_special_tokens=True)


class FunctionReward(DecodingReward):
    """`ppo.rewards[]` of kind `function`: the named Python function, in this actor's process."""

    def __init__(self, function: str, tokenizer_path: str, *, batched: bool = False, trust_remote_code: bool = False):
        super().__init__(tokenizer_path, trust_remote_code)
        self.name, self.batched = function, batched
        self.function = load_function(function)

    def score(
        self, prompts: list[list[int]], responses: list[list[int]], rows: list[PromptRow] | None = None
    ) -> torch.Tensor:
        return call_function(self.function, self.name, rows, self.texts(responses, rows), self.batched)


class HttpReward(DecodingReward):
    """`ppo.rewards[]` of kind `http`: one POST per batch to `url`, retried with backoff."""

    def __init__(
        self,
        url: str,
        tokenizer_path: str,
        *,
        timeout_s: float = 30.0,
        max_retries: int = 3,
        backoff_s: float = 1.0,
        trust_remote_code: bool = False,
    ):
        super().__init__(tokenizer_path, trust_remote_code)
        self.url, self.timeout_s, self.max_retries, self.backoff_s = url, timeout_s, max_retries, backoff_s

    def score(
        self, prompts: list[list[int]], responses: list[list[int]], rows: list[PromptRow] | None = None
    ) -> torch.Tensor:
        return score_over_http(
            self.url,
            rows,
            self.texts(responses, rows),
            timeout_s=self.timeout_s,
            max_retries=self.max_retries,
            backoff_s=self.backoff_s,
        )
