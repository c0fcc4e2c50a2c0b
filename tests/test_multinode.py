"""PPO across the nodes of a real Ray cluster on this machine (tests/ray_nodes.py: a head and worker nodes,
each its own raylet): the generator on one node and the learner, reference and reward model on another, with
the weights crossing through the object store; a node lost mid-run; a loss that leaves no node for a role.

Every run is a `rlhf-ray ppo` process attached to the cluster, as `ray job submit` would start it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.ray_nodes import LocalCluster

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]
ITERATIONS = 10
ON_TRAIN_NODE = {"train_node": 0.25}  # four roles fit on the train node; the generator node holds one generator
GENERATOR_NODE = {"gen_node": 1}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    nodes = LocalCluster(tmp_path_factory.mktemp("cluster"))
    try:
        nodes.add_node("generator-a", 1, GENERATOR_NODE)
        nodes.add_node("train", 2, {"train_node": 1})
        yield nodes
    finally:
        nodes.stop()


def placement(generator: dict) -> list[str]:
    roles = {"generator": generator, "learner": ON_TRAIN_NODE, "reference": ON_TRAIN_NODE, "reward": ON_TRAIN_NODE}
    return [f"resources.role_resources.{role}={json.dumps(needs)}" for role, needs in roles.items()]


def start_ppo(cluster, out: Path, name: str, generator: dict, models) -> tuple[subprocess.Popen, Path]:
    model, reward = models
    command = [sys.executable, "-m", "rlhf_ray.cli", "ppo", "configs/tiny.yaml", f"run.output_dir={out}"]
    command += [f"run.name={name}", f"model.name_or_path={model}", f"ppo.policy_model={model}"]
    command += [f"ppo.reward_model={reward}", "lora.r=8", "lora.alpha=16", "ppo.sample_every=0"]
    command += [f"ppo.iterations={ITERATIONS}", "ppo.checkpoint_every=2", "resources.actor_num_cpus=0.4"]
    command += [f"resources.address={cluster.address}", *placement(generator)]
    log = out / f"{name}.log"
    out.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(command, cwd=REPO, env=cluster.env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    return process, log


def finish(process: subprocess.Popen, log: Path, timeout_s: float = 600) -> str:
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"still running after {timeout_s} s:\n{log.read_text()[-3000:]}")
    return log.read_text()


def rows(run: Path) -> list[dict]:
    path = run / "ppo" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def nodes_of(said: str) -> list[dict[str, str]]:
    """Each `[ppo] actors:` line as role -> node id."""
    return [
        dict(re.findall(r"(\S+) on \S+ node (\w+) \(pid", line.split("actors: ", 1)[1]))
        for line in said.splitlines()
        if "[ppo] actors: " in line
    ]


def assert_same_run(mine: Path, reference: Path) -> None:
    a, b = rows(mine), rows(reference)
    assert [r["step"] for r in a] == list(range(1, ITERATIONS + 1))  # none lost, none repeated
    assert a[-1]["policy_version"] == ITERATIONS and a[-1]["generator_versions_min"] == ITERATIONS
    for key in ("reward_mean", "kl", "response_length"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=1e-4, abs=1e-6), key
    x = load_file(str(mine / "ppo" / "adapter" / "adapter_model.safetensors"))
    y = load_file(str(reference / "ppo" / "adapter" / "adapter_model.safetensors"))
    assert x.keys() == y.keys()
    assert max(float((x[k] - y[k]).abs().max()) for k in x) <= 1e-4


@pytest.fixture(scope="module")
def one_node_run(cluster, tmp_path_factory, tiny_model_dir, tiny_reward_dir):
    out = tmp_path_factory.mktemp("one-node")
    said = finish(*start_ppo(cluster, out, "one-node", ON_TRAIN_NODE, (tiny_model_dir, tiny_reward_dir)))
    assert rows(out / "one-node"), said[-3000:]
    (places,) = nodes_of(said)
    assert len(set(places.values())) == 1, places  # all four roles on the train node
    return out / "one-node"


def test_ppo_across_nodes_equals_the_one_node_run(cluster, one_node_run, tmp_path, tiny_model_dir, tiny_reward_dir):
    said = finish(*start_ppo(cluster, tmp_path, "across", GENERATOR_NODE, (tiny_model_dir, tiny_reward_dir)))
    (places,) = nodes_of(said)
    assert places["rollout-generator-0"] != places["policy-learner"], places
    assert places["policy-learner"] == places["reference-model"] == places["reward-model"], places
    assert_same_run(tmp_path / "across", one_node_run)


def test_the_generator_node_lost_mid_run(cluster, one_node_run, tmp_path, tiny_model_dir, tiny_reward_dir):
    """A second node that can hold a generator has joined; the raylet of the generator's node is killed after
    iteration 2; the generator is re-created on the other node, takes the current weights, and the run equals
    the uninterrupted one-node run."""
    cluster.add_node("generator-b", 1, GENERATOR_NODE)
    process, log = start_ppo(cluster, tmp_path, "node-lost", GENERATOR_NODE, (tiny_model_dir, tiny_reward_dir))
    wait_for_iterations(tmp_path / "node-lost", 2, process, log)
    (first,) = nodes_of(log.read_text())
    lost = cluster.name_of(first["rollout-generator-0"])
    cluster.kill_raylet(lost)
    said = finish(process, log)
    assert process.returncode == 0, said[-3000:]
    assert "rollout-generator-0 (pid" in said and "re-creating it (1/3)" in said, said[-3000:]
    _, again = nodes_of(said)
    assert cluster.name_of(again["rollout-generator-0"]) not in (lost, "train", "head")
    assert_same_run(tmp_path / "node-lost", one_node_run)


def test_a_lost_node_that_leaves_no_place_for_a_role_stops_the_run_naming_it(
    cluster, tmp_path, tiny_model_dir, tiny_reward_dir
):
    process, log = start_ppo(cluster, tmp_path, "no-place", GENERATOR_NODE, (tiny_model_dir, tiny_reward_dir))
    wait_for_iterations(tmp_path / "no-place", 2, process, log)
    (places,) = nodes_of(log.read_text())
    cluster.kill_raylet(cluster.name_of(places["rollout-generator-0"]))  # the only node left offering gen_node
    said = finish(process, log)
    assert process.returncode == 2, said[-3000:]
    assert re.search(
        r"rlhf-ray: error: ppo: rollout-generator-0 died during \w+ \(\w+\) and cannot be re-created: the "
        r"rollout-generator-0 actor needs CPU 0.4, gen_node 1 \(.*resources.role_resources.generator\), and no node",
        said,
    ), said[-3000:]
    assert "Traceback" not in said
    checkpoints = sorted((tmp_path / "no-place" / "ppo" / "checkpoints").glob("iter_*"))
    assert checkpoints and checkpoints[-1].name >= "iter_000002"  # the last complete checkpoint is kept


def wait_for_iterations(run: Path, count: int, process: subprocess.Popen, log: Path, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while len(rows(run)) < count:
        assert process.poll() is None, f"the run ended early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no iteration {count} within {timeout_s} s"
        time.sleep(0.5)


def start_sft(cluster, out: Path, model: Path) -> tuple[subprocess.Popen, Path]:
    command = [sys.executable, "-m", "rlhf_ray.cli", "sft", "configs/tiny.yaml", f"run.output_dir={out}"]
    command += [f"model.name_or_path={model}", "sft.max_steps=40", "sft.eval_every=0", "sft.checkpoint_every=2"]
    command += ["sft.lr=1e-3", "sft.max_failures=1", "resources.role_resources.train_worker={sft_node: 1}"]
    command += [f"resources.address={cluster.address}"]
    out.mkdir(parents=True, exist_ok=True)
    log = out / "sft.log"
    return subprocess.Popen(command, cwd=REPO, env=cluster.env, stdout=log.open("w"), stderr=subprocess.STDOUT), log


def test_an_sft_worker_node_lost_mid_run_restarts_the_group_from_its_last_checkpoint(cluster, tmp_path, tiny_model_dir):
    """Two Ray Train workers, one per node; one node's raylet is killed after step 3 and a third node joins:
    Ray Train restarts the group from the step-2 (or later) checkpoint, and the weights equal a straight run's."""
    cluster.add_node("sft-a", 1, {"sft_node": 1})
    cluster.add_node("sft-b", 1, {"sft_node": 1})
    straight = finish(*start_sft(cluster, tmp_path / "straight", tiny_model_dir))
    assert "[sft] done" in straight, straight[-3000:]

    process, log = start_sft(cluster, tmp_path / "lost", tiny_model_dir)
    metrics = tmp_path / "lost" / "tiny" / "sft" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and '"step": 3' in metrics.read_text()):
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    cluster.add_node("sft-c", 1, {"sft_node": 1})
    cluster.kill_raylet("sft-b")
    said = finish(process, log)
    assert process.returncode == 0, said[-3000:]
    assert "resumed from checkpoint at step" in said, said[-3000:]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 40  # each step once
    a = load_file(str(tmp_path / "straight" / "tiny" / "sft" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "lost" / "tiny" / "sft" / "model" / "model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


def test_an_output_folder_that_a_node_does_not_share_is_refused_before_the_stage_starts(
    cluster, tmp_path, tiny_model_dir
):
    private = tmp_path / "not-shared"
    private.mkdir()
    cluster.add_node("own-disk", 0, {}, private_dir=private)
    try:
        command = [sys.executable, "-m", "rlhf_ray.cli", "sft", "configs/tiny.yaml", f"run.output_dir={private}/runs"]
        command += [f"model.name_or_path={tiny_model_dir}", f"resources.address={cluster.address}"]
        run = subprocess.run(command, cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=300)
    finally:
        cluster.remove_node("own-disk")
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    said = f"rlhf-ray: error: run.output_dir {private}/runs/tiny/sft is not shared: node "
    assert re.search(re.escape(said) + r"\S+ \(\w{8}\) does not see a file this driver wrote there", run.stderr)
    assert "Traceback" not in run.stderr
    assert list(private.iterdir()) == []  # no output folder, no marker left behind


def test_a_run_kept_in_an_object_store_with_its_writers_on_a_node_that_shares_no_disk(
    cluster, tmp_path, tiny_model_dir, tiny_reward_dir, s3_endpoint
):
    """run.output_dir is an s3:// URI of a real S3 server on 127.0.0.1. The SFT worker runs on a node whose working
    copy (run.local_copy_dir) no other node sees: its checkpoints, metrics and model reach the store from there.
    That node goes; the PPO learner runs on a new one, as private and empty: it reads the SFT model from the
    store and sends its checkpoints and export; then, with the driver's working copy deleted, PPO resumes from
    the store alone, and `eval policy` compares the run's start and PPO policies from the store."""
    from tests.s3_server import bucket_uri, stored_files

    copies = tmp_path / "copies"
    copies.mkdir()
    command = [sys.executable, "-m", "rlhf_ray.cli"]
    common = [f"run.output_dir={bucket_uri(s3_endpoint, 'cluster')}", f"run.local_copy_dir={copies}"]
    common += ["run.name=stored", f"model.name_or_path={tiny_model_dir}", f"resources.address={cluster.address}"]
    sft = ["resources.num_workers=1", "deepspeed.zero_stage=0", "resources.role_resources.train_worker={store_node: 1}"]
    roles = {"generator": ON_TRAIN_NODE, "learner": {"store_node": 1}, "reference": ON_TRAIN_NODE}
    ppo = [
        f"resources.role_resources.{role}={json.dumps(needs)}"
        for role, needs in {**roles, "reward": ON_TRAIN_NODE}.items()
    ]  # (no generator node: the tests before may have lost them all)
    ppo += [f"ppo.reward_model={tiny_reward_dir}", "lora.r=8", "lora.alpha=16", "ppo.checkpoint_every=1"]
    ppo += ["resources.actor_num_cpus=0.4", "ppo.sample_every=0"]

    def run(*args: str) -> str:
        done = subprocess.run([*command, *args], cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout + done.stderr

    cluster.add_node("sft-copies", 1, {"store_node": 1}, private_dir=copies)
    try:
        run("sft", "configs/tiny.yaml", *common, *sft)
    finally:
        cluster.remove_node("sft-copies")
    stored = set(stored_files(s3_endpoint, "cluster/runs/stored"))
    assert {"sft/model/export.json", "sft/model/model.safetensors", "sft/metrics.jsonl"} <= stored, sorted(stored)
    assert any(k.startswith("sft/ray/sft/checkpoint_") and k.endswith("/manifest_rank0.json") for k in stored)
    shutil.rmtree(copies / "s3")  # the driver's working copy: from here on the run is only in the store

    cluster.add_node("ppo-copies", 1, {"store_node": 1}, private_dir=copies)
    try:
        said = run("ppo", "configs/tiny.yaml", *common, *ppo, "ppo.iterations=2")
        (places,) = nodes_of(said)
        assert cluster.name_of(places["policy-learner"]) == "ppo-copies", places
        assert f"policy {copies}/s3/cluster/runs/stored/sft/model" in said  # the SFT model, fetched from the store
        stored = set(stored_files(s3_endpoint, "cluster/runs/stored/ppo"))
        finished = {"model/export.json", "model/model.safetensors", "adapter/adapter_model.safetensors"}
        assert {"checkpoints/iter_000002/manifest.json", *finished} <= stored, sorted(stored)

        shutil.rmtree(copies / "s3")  # the driver's working copy again (the learner's node keeps its own)
        said = run("ppo", "configs/tiny.yaml", *common, *ppo, "ppo.iterations=3", "--resume")
        assert "resumed from" in said and "(iteration 2)" in said, said[-3000:]
        metrics = copies / "s3" / "cluster" / "runs" / "stored" / "ppo" / "metrics.jsonl"
        assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3]
        stored = stored_files(s3_endpoint, "cluster/runs/stored/ppo")
        kept = {k.split("/")[1] for k in stored if k.startswith("checkpoints/")}
        assert kept == {"iter_000002", "iter_000003"}  # the pruned one is gone from the store too
        assert stored["metrics.jsonl"] == metrics.stat().st_size

        # eval of the start and the PPO policy, its reference actor (the KL) on the private node
        shutil.rmtree(copies / "s3")
        on_private = 'resources.role_resources.reference={"store_node": 1}'
        said = run("eval", "policy", "configs/tiny.yaml", *common, *ppo, on_private, "--split=all", "--limit=4")
        assert "[eval policy] done" in said, said[-3000:]
        assert {"eval.json", "report.md"} <= set(stored_files(s3_endpoint, "cluster/runs/stored/eval/policy"))
    finally:
        cluster.remove_node("ppo-copies")
