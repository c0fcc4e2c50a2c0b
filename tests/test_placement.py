"""The start-up check that a run's actors and workers fit the cluster, and the Ray address probe."""

from __future__ import annotations

import socket
import time

import pytest

from rlhf_ray.placement import Node, Request, first_unplaceable
from rlhf_ray.ray_session import ClusterUnreachable, check_reachable

pytestmark = pytest.mark.unit


def worker(i: int, cpus: float, gpus: float = 0.0) -> Request:
    return Request(f"sft worker {i}", {"CPU": cpus, "GPU": gpus}, "resources.cpus_per_worker")


def test_requests_that_fit_together_pass():
    assert first_unplaceable([worker(1, 1), worker(2, 1)], [Node("10.0.0.1", {"CPU": 2.0})]) is None
    two_nodes = [Node("10.0.0.1", {"CPU": 2.0}), Node("10.0.0.2", {"CPU": 2.0})]
    assert first_unplaceable([worker(i, 2) for i in (1, 2)], two_nodes) is None
    # zero amounts ask for nothing: a CPU-only node holds a request of GPU 0
    assert first_unplaceable([worker(1, 0.5, 0.0)], [Node("a", {"CPU": 1.0})]) is None


def test_a_request_larger_than_any_node_is_named_with_what_the_nodes_have():
    problem = first_unplaceable([worker(1, 4)], [Node("10.0.0.1", {"CPU": 2.0})])
    assert problem == (
        "sft worker 1 needs CPU 4 (resources.cpus_per_worker), and no node of the cluster can hold it: "
        "node 10.0.0.1: CPU 2 in all, CPU 0 taken. Ask for less, or attach to a cluster that has more "
        "(resources.address)"
    )


def test_requests_that_each_fit_but_not_all_at_once_are_caught():
    """Two workers of 1.5 CPUs each fit a 2-CPU node one at a time, never together (Ray would wait forever)."""
    problem = first_unplaceable([worker(1, 1.5), worker(2, 1.5)], [Node("n", {"CPU": 2.0})])
    assert problem.startswith("sft worker 2 needs CPU 1.5")
    assert "beside the other roles placed first: node n: CPU 2 in all, CPU 1.5 taken" in problem


def test_a_gpu_on_a_cpu_only_cluster_and_largest_first_packing():
    learner = Request("ppo learner", {"CPU": 0.5, "GPU": 1.0}, "resources.learner_num_gpus")
    problem = first_unplaceable([learner], [Node("n", {"CPU": 2.0})])
    assert problem.startswith("ppo learner needs CPU 0.5, GPU 1 (resources.learner_num_gpus)")
    # largest first: the 2-CPU request takes the 2-CPU node before the small ones fill it
    nodes = [Node("big", {"CPU": 2.0}), Node("small", {"CPU": 1.0})]
    assert first_unplaceable([worker(1, 0.5), worker(2, 0.5), worker(3, 2)], nodes) is None


def test_a_ray_address_where_nothing_answers_fails_in_seconds_naming_it():
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    began = time.monotonic()
    with pytest.raises(ClusterUnreachable, match=f"resources.address 127.0.0.1:{port}: nothing answers at"):
        check_reachable(f"127.0.0.1:{port}", "resources.address")
    assert time.monotonic() - began < 10
    with pytest.raises(ClusterUnreachable, match=f"RAY_ADDRESS ray://127.0.0.1:{port}"):
        check_reachable(f"ray://127.0.0.1:{port}", "RAY_ADDRESS")


def test_an_address_that_answers_and_the_forms_left_to_ray_pass():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        check_reachable(f"127.0.0.1:{server.getsockname()[1]}", "resources.address")
    for address in ("auto", "local", "some-host"):
        check_reachable(address, "resources.address")


def test_role_resources_and_spread_reach_the_actors_the_workers_and_the_sweeps_bundles():
    from rlhf_ray.config import load_config
    from rlhf_ray.ppo.launch import role_options, role_requests
    from rlhf_ray.sweep import trial_resources
    from rlhf_ray.train.launch import worker_requests

    config = load_config(
        "configs/tiny.yaml",
        [
            "resources.role_resources={generator: {gen_node: 1}, train_worker: {trainer: 0.5}}",
            "resources.spread_roles=true",
            "resources.learner_num_gpus=1",
        ],
    )
    generator = role_options(config, "generator")
    assert generator["resources"] == {"gen_node": 1.0} and generator["scheduling_strategy"] == "SPREAD"
    assert role_options(config, "learner")["num_gpus"] == 1.0 and "resources" not in role_options(config, "learner")

    request, learner, *_ = role_requests(config)
    assert request.needs() == {"CPU": 0.5, "gen_node": 1.0} and learner.needs() == {"CPU": 0.5, "GPU": 1.0}
    problem = first_unplaceable([request], [Node("10.0.0.1", {"CPU": 2.0})])
    assert problem.startswith(
        "the rollout-generator-0 actor needs CPU 0.5, gen_node 1 (resources.actor_num_cpus, "
        "resources.generator_num_gpus, resources.role_resources.generator)"
    )
    assert first_unplaceable([request], [Node("a", {"CPU": 2.0}), Node("b", {"CPU": 2.0, "gen_node": 1.0})]) is None

    workers = worker_requests("sft", config.resources)
    assert [w.needs() for w in workers] == [{"CPU": 0.5, "trainer": 0.5}] * 2
    assert workers[0].settings == "resources.cpus_per_worker, resources.role_resources.train_worker"

    bundles = trial_resources(config)
    assert bundles.strategy == "SPREAD"
    assert bundles.bundles == [
        {"CPU": 0.1},
        {"CPU": 0.5, "gen_node": 1.0},
        {"CPU": 0.5, "GPU": 1.0},
        {"CPU": 0.5},
        {"CPU": 0.5},
    ]
