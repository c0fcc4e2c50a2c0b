"""Forward passes shared by the policy learner and the reference model."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf_ray.algo.ppo import entropy_from_logits, logprobs_from_logits
from rlhf_ray.models.build import backbone_and_head
from rlhf_ray.wire import PackedBatch, at_response_positions


@dataclass
class ResponseOutputs:
    logprobs: torch.Tensor  # (B, A) log-prob of each sampled response token
    entropy: torch.Tensor | None = None  # (B, A), without gradient (a statistic)
    hidden: torch.Tensor | None = None  # (B, A, H) last hidden state before each response token


def response_forward(
    model, batch: PackedBatch, *, entropy: bool = False, hidden: bool = False, temperature: float = 1.0
) -> ResponseOutputs:
    """Log-probs (under the sampling temperature) of the response tokens, optionally entropy and hidden states.

    Only the positions that predict a response token go through the LM head (the prompt's positions
    would cost a vocabulary-sized projection each for nothing), unless the model's forward does more
    than `head(backbone(x))`; then it runs whole.
    """
    parts = backbone_and_head(model)
    if parts is not None:
        backbone, head = parts
        states = backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        response_states = at_response_positions(states, batch.positions)  # (B, A, H)
        logits = head(response_states)
    else:
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=hidden)
        logits = at_response_positions(out.logits, batch.positions)
        response_states = at_response_positions(out.hidden_states[-1], batch.positions) if hidden else None
    logits = logits.float()  # (B, A, V)
    if temperature != 1.0:  # (dividing by 1 would only copy the vocabulary-sized tensor)
        logits = logits / temperature
    result = ResponseOutputs(logprobs_from_logits(logits, batch.response_ids) * batch.response_mask)
    if entropy:  # a statistic only: no gradient flows through it
        with torch.no_grad():
            result.entropy = entropy_from_logits(logits) * batch.response_mask
    if hidden:
        result.hidden = response_states
    return result
