"""RewardModel: the trained RM from the RM job; scores (prompt, response) batches."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rlhf_ray.models.loading import default_device, torch_dtype
from rlhf_ray.models.precision import autocast, resolve_precision
from rlhf_ray.wire import PromptRow


class RewardModel:
    """Scores full sequences at their last token, normalised with the RM's saved mean/std if asked.

    `end_of_turn_suffix` holds the tokens the chat template puts after EOS (e.g. "\\n"); they are
    appended to responses that ended with EOS, so the RM sees sequences shaped like its training data.
    """

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "float32",
        normalize: bool = True,
        clip: float = 10.0,
        eos_token_id: int,
        end_of_turn_suffix: list[int],
        trust_remote_code: bool = False,
        precision: str = "fp32",
    ):
        from transformers import AutoModelForSequenceClassification

        self.model = (
            AutoModelForSequenceClassification.from_pretrained(
                model_path, dtype=torch_dtype(dtype), use_safetensors=True, trust_remote_code=trust_remote_code
            )
            .to(default_device())
            .eval()
        )
        self.model.requires_grad_(False)
        self.precision = resolve_precision(precision, self.model.device.type)  # scores are taken in fp32
        self.pad_id = self.model.config.pad_token_id
        self.eos_token_id, self.suffix = eos_token_id, list(end_of_turn_suffix)
        self.mean, self.std = 0.0, 1.0
        stats = Path(model_path) / "reward_stats.json"
        if normalize:
            if not stats.is_file():
                raise FileNotFoundError(f"{stats} not found: ppo.normalize_reward needs the RM job's reward statistics")
            saved = json.loads(stats.read_text())
            self.mean, self.std = float(saved["mean"]), max(float(saved["std"]), 1e-6)
        self.clip = clip

    @torch.no_grad()
    def score(
        self, prompts: list[list[int]], responses: list[list[int]], rows: list[PromptRow] | None = None
    ) -> torch.Tensor:
        """(B,) rewards: (raw - mean) / std, clipped to [-clip, clip]. The model reads tokens only (not `rows`)."""
        sequences = [
            p + r + (self.suffix if r and r[-1] == self.eos_token_id else []) for p, r in zip(prompts, responses)
        ]
        width = max(len(s) for s in sequences)
        input_ids = torch.tensor([s + [self.pad_id] * (width - len(s)) for s in sequences])
        attention_mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
        device = self.model.device
        with autocast(self.precision, device.type):
            logits = self.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        raw = logits.squeeze(-1).float().cpu()
        return ((raw - self.mean) / self.std).clamp(-self.clip, self.clip)
