"""Attach to a running Ray cluster, or start a local one (dashboard on 127.0.0.1 only)."""

from __future__ import annotations

import os

from rlhf_ray.config import ResourcesConfig


def connect(resources: ResourcesConfig) -> str:
    """`resources.address`, else RAY_ADDRESS, else a new local Ray. Returns what was used."""
    import ray

    if ray.is_initialized():
        return "already connected"
    address = resources.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return f"attached to {address}"
    # address="local": a new cluster even if a stale or foreign one left its address file in /tmp/ray
    ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1")
    return "started a local Ray"
