"""Rewards from a Python function named in the config (`ppo.rewards[].function`).

The name is `package.module:function` (importable where the reward actor runs) or
`path/to/file.py:function`. A function is called one row at a time as
`function(prompt, response, fields) -> number`, or, with `batched: true`, once per batch as
`function(prompts, responses, fields) -> list of numbers`. `prompt` is the text of the prompt's last
message, `response` the decoded response (special tokens removed), `fields` the prompt row's extra
JSON fields (for example a reference `answer`).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path

import torch

from rlhf_ray.rewards.checks import RewardError, as_reward, checked_rewards, row_name
from rlhf_ray.wire import PromptRow


def split_name(name: str) -> tuple[str, str]:
    """`module:function` -> (module, function); a ValueError when it is not of that shape."""
    module, sep, function = name.rpartition(":")
    if not sep or not module or not function.isidentifier():
        raise ValueError(f"reward function {name!r}: expected 'package.module:function' or 'path/file.py:function'")
    return module, function


def load_function(name: str) -> Callable:
    """The callable `name` refers to; a RewardError saying what is missing when it cannot be found."""
    module_name, attribute = split_name(name)
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise FileNotFoundError(f"no such file: {path}")
            spec = importlib.util.spec_from_file_location(f"rlhf_ray_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except Exception as err:
        raise RewardError(f"reward function {name}: cannot import {module_name}: {type(err).__name__}: {err}") from err
    function = getattr(module, attribute, None)
    if not callable(function):
        raise RewardError(f"reward function {name}: {module_name} has no callable {attribute!r}")
    return function


def call_function(
    function: Callable, name: str, rows: list[PromptRow], responses: list[str], batched: bool
) -> torch.Tensor:
    """(B,) rewards of `function`; its exceptions and unusable results become a RewardError naming the row."""
    source = f"reward function {name}"
    if batched:
        try:
            values = function([r.text for r in rows], responses, [dict(r.fields) for r in rows])
        except Exception as err:
            raise RewardError(f"{source} raised {type(err).__name__}: {err} (on a batch of {len(rows)})") from err
        return checked_rewards(values, source, rows)
    rewards = []
    for index, (row, response) in enumerate(zip(rows, responses)):
        try:
            value = function(row.text, response, dict(row.fields))
        except Exception as err:
            raise RewardError(f"{source} raised {type(err).__name__}: {err} on {row_name(rows, index)}") from err
        rewards.append(as_reward(value, source, rows, index))
    return torch.tensor(rewards, dtype=torch.float32)
