"""The names of the algorithm's choices (no torch: the config imports them)."""

from __future__ import annotations

from typing import Literal, get_args

AdvantageEstimator = Literal["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp"]
ESTIMATORS: tuple[str, ...] = get_args(AdvantageEstimator)
GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo")  # they compare the responses to one prompt

LossAggregationMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
LOSS_AGGREGATIONS: tuple[str, ...] = get_args(LossAggregationMode)

KLEstimator = Literal["k1", "k2", "k3"]
KL_ESTIMATORS: tuple[str, ...] = get_args(KLEstimator)
