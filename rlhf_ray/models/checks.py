"""Model folders checked before anything starts: config, safetensors headers, tokenizer files, the right head.

Each problem is one ValueError naming the folder (or file) and what is wrong with it, raised before Ray
starts, so a bad folder costs seconds, not a worker group's restarts.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
# What the architecture name of a role's model ends with (transformers' class naming).
ROLE_HEADS = {"policy": "ForCausalLM", "reward model": "ForSequenceClassification"}


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a valid JSON config ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file cannot be loaded (unreadable header, or shorter or longer than its header says)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return f"{size} bytes, too short to hold a safetensors header"
        (header_size,) = struct.unpack("<Q", head)
        if header_size > size - 8:
            return f"its header claims {header_size} bytes but the file has {size}"
        try:
            header = json.loads(handle.read(header_size))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return "its header is not valid JSON"
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    expected = 8 + header_size + max(ends, default=0)
    if size != expected:
        return f"{size} bytes where its tensors need {expected} (truncated or padded)"
    return None


def check_weights(folder: Path) -> None:
    """Every .safetensors file in `folder` is whole; a ValueError naming the first that is not."""
    for path in sorted(folder.glob("*.safetensors")):
        problem = safetensors_problem(path)
        if problem:
            raise ValueError(f"{path} cannot be loaded: {problem}")


def check_tokenizer(folder: Path) -> None:
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(
            f"{folder} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); "
            "save the tokenizer there or set model.tokenizer"
        )


def check_role(folder: Path, role: str) -> None:
    """`folder`'s model has the head `role` needs (a causal LM for the policy, a scalar head for the reward model)."""
    architectures = read_config(folder).get("architectures") or []
    head = ROLE_HEADS[role]
    if architectures and not any(name.endswith(head) for name in architectures):
        raise ValueError(
            f"{folder} holds a {architectures[0]}, but the {role} must be a ...{head} "
            f"({'the SFT model or a base model' if role == 'policy' else 'the RM job`s model: rlhf-ray rm'})"
        )
