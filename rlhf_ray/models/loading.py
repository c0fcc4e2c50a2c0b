"""Load tokenizers and causal LMs from local folders (safetensors only)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_ray.models.checks import check_weights, read_config

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

_DTYPE_NAMES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """Map "float32"/"bfloat16"/"float16" (or fp32/bf16/fp16) to a torch dtype."""
    import torch

    if isinstance(name, torch.dtype):
        return name
    key = _DTYPE_NAMES.get(str(name).lower())
    if key is None:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(set(_DTYPE_NAMES.values()))}")
    return getattr(torch, key)


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer; guarantee a pad token (eos if none). padding_side is left to callers."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer in {path} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def require_safetensors(path: str | Path) -> Path:
    """`path` as a model folder with a readable config.json and whole safetensors weights, or a ValueError saying
    what is missing or broken.

    Pickled weights (pytorch_model.bin) can run code when loaded, so they are refused.
    """
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is not a model folder (no config.json)")
    read_config(folder)
    if not any(folder.glob("*.safetensors")):
        found = sorted(p.name for p in folder.glob("*.bin")) or "no weight files"
        raise ValueError(f"{folder} has no .safetensors weights ({found}); only safetensors checkpoints are loaded")
    check_weights(folder)
    return folder


def load_causal_lm(
    path: str | Path, dtype: str | torch.dtype = "float32", trust_remote_code: bool = False
) -> PreTrainedModel:
    """Load an AutoModelForCausalLM from a local folder whose weights are safetensors.

    dtype is "float32", "bfloat16", "float16" or "auto" (the checkpoint's own dtype).
    """
    from transformers import AutoModelForCausalLM

    folder = require_safetensors(path)
    resolved: Any = "auto" if dtype == "auto" else torch_dtype(dtype)
    return AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=resolved, use_safetensors=True, trust_remote_code=trust_remote_code
    )


def default_device() -> torch.device:
    """The GPU Ray gave this process, else the CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
