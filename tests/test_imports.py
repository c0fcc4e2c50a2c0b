import ast
import subprocess
import sys

import pytest

from tests import import_graph

pytestmark = pytest.mark.unit

LIGHT_MODULES = [
    "rlhf_ray",
    "rlhf_ray.algo.losses",
    "rlhf_ray.algo.ppo",
    "rlhf_ray.config",
    "rlhf_ray.formats.load",
    "rlhf_ray.tokenization",
    "rlhf_ray.models",
    "rlhf_ray.cli",
]


@pytest.mark.parametrize("module", LIGHT_MODULES)
def test_library_imports_without_ray_deepspeed_vllm(module):
    code = (
        f"import sys, {module}\n"
        "heavy = sorted(m for m in ('ray', 'deepspeed', 'vllm') if m in sys.modules)\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"importing {module} imported {out}"


# Layers, lowest first: a node imports only from nodes of lower layers, so no package imports itself
# back through another. Actors are plain classes that the driver side wraps with ray.remote; they see
# only the wire types, model building, pure math, the reward sources' checks and the config.
LAYERS = [
    {
        "rlhf_ray",
        "rlhf_ray.algo",
        "rlhf_ray.formats",
        "rlhf_ray.wire",
        "rlhf_ray.typed_yaml",
        "rlhf_ray.checkpoints",
        "rlhf_ray.run_log",
        "rlhf_ray.dashboard_metrics",
        "rlhf_ray.placement",
        "rlhf_ray.storage",
    },
    {"rlhf_ray.config", "rlhf_ray.tokenization", "rlhf_ray.roles", "rlhf_ray.rewards"},
    {"rlhf_ray.models", "rlhf_ray.ray_session", "rlhf_ray.config_reference"},
    {"actors", "rlhf_ray.train"},
    {"rlhf_ray.ppo"},
    {"rlhf_ray.evaluation", "rlhf_ray.data_inspect"},
    {"rlhf_ray.pipeline", "rlhf_ray.sweep"},
    {"cli"},
]
LAYER_OF = {node: level for level, nodes in enumerate(LAYERS) for node in nodes}
ACTORS_MAY_IMPORT = {"rlhf_ray.wire", "rlhf_ray.models", "rlhf_ray.algo", "rlhf_ray.config", "rlhf_ray.rewards"}
NEVER = {("rlhf_ray.ppo", "rlhf_ray.train")}  # PPO builds its models through rlhf_ray.models, not the SFT/RM jobs


def _violations():
    found = {}
    for (source, target), edges in import_graph.package_edges(import_graph.edges()).items():
        why = (
            [f"{source} (layer {LAYER_OF[source]}) imports {target} (layer {LAYER_OF[target]})"]
            if LAYER_OF[target] >= LAYER_OF[source]
            else []
        )
        why += [f"{source} must not import {target}"] if (source, target) in NEVER else []
        why += (
            [f"actors may import only {sorted(ACTORS_MAY_IMPORT)}"]
            if source == "actors" and target not in ACTORS_MAY_IMPORT
            else []
        )
        if why:
            found[(source, target)] = "; ".join(why) + ": " + ", ".join(edge.where for edge in edges)
    return found


def test_every_package_has_a_layer():
    nodes = {import_graph.node_of(module) for module in import_graph.own_modules()}
    assert nodes - set(LAYER_OF) == set(), "add the new package to LAYERS"


def test_packages_import_one_way():
    found = _violations()
    assert not found, "\n".join(found.values())


def test_ray_is_started_only_through_the_ray_session_module_attribute():
    """tests/test_bad_input.py replaces `rlhf_ray.ray_session.connect` to prove that bad input stops a run
    before Ray starts; a module that bound `connect` by name at import would slip past that check."""
    bound = [
        f"{path}:{node.lineno}"
        for path in import_graph.own_modules().values()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom)
        and node.module == "rlhf_ray.ray_session"
        and any(alias.name == "connect" for alias in node.names)
    ]
    assert not bound, f"import the module (from rlhf_ray import ray_session), not connect: {bound}"


# Own-module imports inside functions, where they are wanted: the CLI imports a subcommand's code only when
# that subcommand runs (so `rlhf-ray --help` and `config show` stay quick); the SFT/RM driver does not load
# the Ray Train worker's module (torch.distributed, DeepSpeed) in its own process.
LOCAL_IMPORTS_ALLOWED = {"rlhf_ray.cli", "rlhf_ray.train.launch"}


def test_own_modules_are_imported_at_the_top_except_where_laziness_is_wanted():
    local = sorted(
        edge.where for edge in import_graph.edges() if edge.local and edge.source not in LOCAL_IMPORTS_ALLOWED
    )
    assert not local, f"import these at the top of the module: {local}"
