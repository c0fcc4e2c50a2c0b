"""The GPU scenario files are checked though not run here: each loads under the config schema, and what its
stages ask of Ray fits the cluster the file is written for (its `# nodes:` line), stage by stage, as the
start-up check would place it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf_ray.config import load_config
from rlhf_ray.models.optim import deepspeed_config, learner_deepspeed_config
from rlhf_ray.placement import Node, Request, first_unplaceable
from rlhf_ray.ppo.launch import role_requests
from rlhf_ray.train.launch import worker_requests

pytestmark = pytest.mark.unit

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SCENARIOS = ["gpu-1node.yaml", "multinode.yaml"]


def cluster_of(path: Path) -> list[Node]:
    (line,) = [line for line in path.read_text().splitlines() if line.startswith("# nodes: ")]
    return [Node(f"{i}", node) for i, node in enumerate(json.loads(line.removeprefix("# nodes: ")))]


def fits(requests: list[Request], path: Path) -> str | None:
    return first_unplaceable(requests, cluster_of(path))


@pytest.mark.parametrize("name", SCENARIOS)
def test_a_gpu_scenario_loads_and_each_stage_fits_its_cluster(name):
    path = CONFIGS / name
    config = load_config(path)
    assert config.resources.use_gpu and config.model.precision == "auto"
    for stage in ("sft", "rm"):  # the stages run one after another, each on the whole cluster
        assert fits(worker_requests(stage, config.resources), path) is None, stage
        deepspeed_config(config, getattr(config, stage), config.resources.num_workers)
    ppo = role_requests(config)
    assert fits(ppo, path) is None
    gpus = sum(request.needs().get("GPU", 0) for request in ppo)
    assert gpus == config.resources.generator_replicas * config.ppo.vllm_tensor_parallel_size + 3
    if config.ppo.learner_backend == "deepspeed":
        learner_deepspeed_config(config)


def test_the_arithmetic_check_fails_a_scenario_that_asks_for_more_gpus_than_its_node_has():
    config = load_config(CONFIGS / "gpu-1node.yaml", ["resources.generator_replicas=3"])  # 3 x 2 + 3 = 9 of 8
    assert "GPU" in fits(role_requests(config), CONFIGS / "gpu-1node.yaml")
    config = load_config(CONFIGS / "multinode.yaml", ["resources.num_workers=17"])  # 17 GPU workers on 2 x 8
    assert "sft worker" in fits(worker_requests("sft", config.resources), CONFIGS / "multinode.yaml")


def test_the_multinode_roles_land_on_the_nodes_that_offer_their_resources():
    path = CONFIGS / "multinode.yaml"
    config = load_config(path)
    nodes = cluster_of(path)
    assert first_unplaceable(role_requests(config), nodes) is None
    rollout, *train = nodes
    assert rollout.used.get("GPU") == 8 and rollout.used.get("rollout_node") == 1  # the four generators
    assert sum(node.used.get("GPU", 0) for node in train) == 3  # learner, reference, reward


def test_tensor_parallel_generators_must_hold_their_gpus_and_take_adapters():
    with pytest.raises(Exception, match="resources.generator_num_gpus is 1; set it to 2"):
        load_config(CONFIGS / "gpu-1node.yaml", ["resources.generator_num_gpus=1"])
    with pytest.raises(Exception, match="set ppo.weight_sync=adapter"):
        load_config(CONFIGS / "gpu-1node.yaml", ["ppo.weight_sync=merged"])


@pytest.mark.parametrize(
    "overrides, on_gpu, expected",
    [
        ([], False, False),  # CPU: model.precision autocasts; DeepSpeed keeps fp32 weights
        (["model.precision=bf16-mixed"], False, False),
        (["model.precision=fp32"], True, False),  # fp32 stays one setting away on GPUs too
        (["model.precision=bf16-mixed"], True, True),
        (["model.precision=auto"], True, "auto"),  # settled by the process that holds the GPU
        (["model.precision=fp32", "deepspeed.bf16=true"], True, True),  # deepspeed.bf16 wins where set
        (["deepspeed.bf16=false"], True, False),
    ],
)
def test_deepspeed_bf16_follows_model_precision_on_gpus(overrides, on_gpu, expected):
    from rlhf_ray.models.optim import bf16_setting

    assert bf16_setting(load_config(CONFIGS / "tiny.yaml", overrides), on_gpu) == expected


def test_bf16_auto_is_settled_where_the_engine_starts():
    from rlhf_ray.models.optim import settle_bf16

    config = load_config(CONFIGS / "gpu-1node.yaml")
    assert deepspeed_config(config, config.sft, 8)["bf16"] == {"enabled": "auto"}
    assert learner_deepspeed_config(config)["bf16"] == {"enabled": "auto"}
    settled = settle_bf16(learner_deepspeed_config(config))
    assert settled["bf16"]["enabled"] is False  # this machine has no GPU
    assert settle_bf16({"bf16": {"enabled": True}}) == {"bf16": {"enabled": True}}
