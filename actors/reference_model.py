"""ReferenceModel: the frozen starting policy; per-token log-probs of responses."""

from __future__ import annotations

import torch

from rlhf_ray.models.forward import response_forward
from rlhf_ray.models.loading import default_device, load_causal_lm
from rlhf_ray.models.precision import autocast, resolve_precision
from rlhf_ray.wire import PackedBatch


class ReferenceModel:
    def __init__(
        self,
        model_path: str,
        dtype: str = "float32",
        temperature: float = 1.0,
        trust_remote_code: bool = False,
        precision: str = "fp32",
    ):
        self.device = default_device()
        self.precision = resolve_precision(precision, self.device.type)  # as the learner's, so KL starts at 0
        self.model = load_causal_lm(model_path, dtype, trust_remote_code).to(self.device).eval()
        self.model.requires_grad_(False)
        self.temperature = temperature

    @torch.no_grad()
    def logprobs(self, batch: PackedBatch) -> torch.Tensor:
        """(B, A) log-probs of the response tokens under the reference policy."""
        with autocast(self.precision, self.device.type):
            return response_forward(self.model, batch.to(self.device), temperature=self.temperature).logprobs.cpu()
