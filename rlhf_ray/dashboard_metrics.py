"""Custom metrics for the Ray dashboard and Prometheus (`ray.util.metrics`), tagged by run and stage.

Prometheus sees them with Ray's `ray_` prefix, e.g. `ray_rlhf_ray_reward_mean{run="demo",stage="ppo"}`.
"""

from __future__ import annotations

EXPORTED = {
    "reward_mean": "mean reward-model score of the iteration's responses",
    "kl": "KL to the reference policy, nats per sequence",
    "generated_tokens_per_s": "rollout generation throughput",
    "tokens_per_s": "training throughput (SFT/RM)",
    "policy_version": "adapter version the learner last produced",
    "samples_seen": "responses collected so far",
    "loss": "training loss (SFT/RM)",
    "eval_accuracy": "held-out reward-model accuracy",
    "actor_restarts": "PPO actors re-created after dying, in this driver process",
    "skipped_updates": "PPO updates skipped because of NaN/inf",
}
PHASE_PREFIX = "seconds_"
_gauges: dict = {}  # one Gauge per name per process (Ray refuses duplicates)


def _gauge(name: str, description: str, tag_keys: tuple[str, ...]):
    from ray.util.metrics import Gauge

    if name not in _gauges:
        _gauges[name] = Gauge(f"rlhf_ray_{name}", description=description, tag_keys=tag_keys)
    return _gauges[name]


def publish(metrics: dict, run: str, stage: str) -> None:
    """Set the exported gauges from one metrics row; phase timings go to one gauge tagged by phase."""
    tags = {"run": run, "stage": stage}
    for key, value in metrics.items():
        if not isinstance(value, (int, float)):
            continue
        if key in EXPORTED:
            _gauge(key, EXPORTED[key], ("run", "stage")).set(float(value), tags=tags)
        elif key.startswith(PHASE_PREFIX):
            phase = key[len(PHASE_PREFIX) :]
            _gauge("phase_seconds", "seconds per phase of the latest iteration", ("run", "stage", "phase")).set(
                float(value), tags={**tags, "phase": phase}
            )
