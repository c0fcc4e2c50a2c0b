"""Security defaults, checked by reading the project's own sources.

An `ast` scan of rlhf_ray/, actors/, bench/ and data/make_demo.py (not tests/, not .venv) fails,
naming file:line, on:

- trust_remote_code=True written as a literal (it must come from config.model.trust_remote_code),
- torch.load(...) without weights_only=True (a pickle can run code),
- <engine>.load_checkpoint(...) outside rlhf_ray/models/safe_load.py (DeepSpeed unpickles with
  weights_only=False; `load_deepspeed_checkpoint` reads its files with the weights-only loader),
- save_pretrained(..., safe_serialization=False) (pickled weights instead of safetensors),
- Tuner.restore(...) (Ray Tune unpickles the experiment folder; a resumed sweep lists its trials again
  and each resumes from its own PPO checkpoint),
- yaml.load / full_load / unsafe_load (YAML tags can build arbitrary objects; use safe_load),
- the address "0.0.0.0" (in Python strings, configs/*.yaml, the Makefile and the commands of README.md and
  docs/*.md),
- a Ray dashboard host other than 127.0.0.1 (ray.init(dashboard_host=...), `ray start --dashboard-host`).

Each rule is first run on a snippet that breaks it, so a scan that finds nothing is not vacuous.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"
RULES = (
    "trust_remote_code",
    "torch_load",
    "deepspeed_load",
    "safe_serialization",
    "tune_restore",
    "yaml_load",
    "any_address",
    "dashboard_host",
)


@dataclass(frozen=True)
class Finding:
    where: str  # "file:line"
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: [{self.rule}] {self.message}"


def _dotted(node: ast.AST) -> str:
    """`torch.load` for torch.load(...), `model.save_pretrained` for model.save_pretrained(...), '' if not a name."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return f"{inner}.{node.attr}" if inner else node.attr
    return ""


def _is_const(node: ast.AST | None, value) -> bool:
    return isinstance(node, ast.Constant) and type(node.value) is type(value) and node.value == value


def _imported_from(tree: ast.AST, module: str, name: str) -> set[str]:
    """Local names bound by `from module import name [as alias]`."""
    return {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == module
        for alias in node.names
        if alias.name == name
    }


def _check_call(node: ast.Call, torch_loads: set[str], yaml_loads: set[str]) -> list[tuple[str, str]]:
    name = _dotted(node.func)
    kwargs = {kw.arg: kw.value for kw in node.keywords if kw.arg is not None}
    found = []
    if _is_const(kwargs.get("trust_remote_code"), True):
        found.append(
            (
                "trust_remote_code",
                f"{name or 'call'}(trust_remote_code=True): take it from config.model.trust_remote_code",
            )
        )
    if (name == "torch.load" or name in torch_loads) and not _is_const(kwargs.get("weights_only"), True):
        found.append(("torch_load", f"{name}(...) without weights_only=True"))
    if name.split(".")[-1] == "load_checkpoint" and "." in name:
        found.append(("deepspeed_load", f"{name}(...): use models.safe_load.load_deepspeed_checkpoint"))
    if name.split(".")[-1] == "save_pretrained" and _is_const(kwargs.get("safe_serialization"), False):
        found.append(("safe_serialization", f"{name}(..., safe_serialization=False): save safetensors"))
    if name.endswith("Tuner.restore"):
        found.append(("tune_restore", f"{name}(...) unpickles the experiment folder"))
    if (
        name in ("yaml.load", "yaml.full_load", "yaml.unsafe_load", "yaml.load_all", "yaml.unsafe_load_all")
        or name in yaml_loads
    ):
        found.append(("yaml_load", f"{name}(...): use yaml.safe_load"))
    if name == "ray.init" and "dashboard_host" in kwargs and not _is_const(kwargs["dashboard_host"], LOOPBACK):
        found.append(("dashboard_host", f"ray.init(dashboard_host=...) must be the literal '{LOOPBACK}'"))
    return found


def _check_argv(node: ast.List | ast.Tuple) -> list[tuple[str, str]]:
    """A command list such as ["ray", "start", "--dashboard-host", host]: the host must be the literal loopback."""
    items = node.elts
    for i, item in enumerate(items):
        if _is_const(item, "--dashboard-host"):
            value = items[i + 1] if i + 1 < len(items) else None
            if not _is_const(value, LOOPBACK):
                return [("dashboard_host", f"--dashboard-host in a command list must be followed by '{LOOPBACK}'")]
        elif (
            isinstance(item, ast.Constant)
            and isinstance(item.value, str)
            and item.value.startswith("--dashboard-host=")
            and item.value.split("=", 1)[1] != LOOPBACK
        ):
            return [("dashboard_host", f"{item.value}: the dashboard must stay on {LOOPBACK}")]
    return []


def scan_text(text: str, filename: str, first_line: int = 1) -> list[Finding]:
    """Shell commands and config text: 0.0.0.0 anywhere, and `ray start --dashboard-host X` with X not loopback."""
    findings = []
    for offset, line in enumerate(text.splitlines()):
        where = f"{filename}:{first_line + offset}"
        if "0.0.0.0" in line:
            findings.append(Finding(where, "any_address", "0.0.0.0 listens on every interface"))
        if re.search(r"\bray\s+start\b", line):
            # (the host ends at a quote, or at Markdown's backtick or punctuation in a comment)
            for host in re.findall(r"--dashboard-host[=\s]+['\"]?([^\s'\"`,;)]+)", line):
                if host != LOOPBACK:
                    findings.append(
                        Finding(where, "dashboard_host", f"ray start --dashboard-host {host}: keep it on {LOOPBACK}")
                    )
    return findings


def scan_python(source: str, filename: str) -> list[Finding]:
    """Every rule over one Python module."""
    tree = ast.parse(source, filename)
    torch_loads = _imported_from(tree, "torch", "load")
    yaml_loads = {n for name in ("load", "full_load", "unsafe_load") for n in _imported_from(tree, "yaml", name)}
    findings = []
    for node in ast.walk(tree):
        found: list[tuple[str, str]] = []
        if isinstance(node, ast.Call):
            found = _check_call(node, torch_loads, yaml_loads)
        elif isinstance(node, ast.Dict):  # f(**{"trust_remote_code": True})
            found = [
                ("trust_remote_code", "{'trust_remote_code': True}: take it from config.model.trust_remote_code")
                for key, value in zip(node.keys, node.values)
                if _is_const(key, "trust_remote_code") and _is_const(value, True)
            ]
        elif isinstance(node, (ast.List, ast.Tuple)):
            found = _check_argv(node)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            findings += scan_text(node.value, filename, node.lineno)
        findings += [Finding(f"{filename}:{node.lineno}", rule, message) for rule, message in found]
    return findings


def readme_commands(text: str) -> list[tuple[int, str]]:
    """(first line number, text) of each fenced code block of a Markdown file."""
    blocks, start, lines = [], None, text.splitlines()
    for number, line in enumerate(lines, start=1):
        if line.lstrip().startswith("```"):
            if start is None:
                start = number + 1
            else:
                blocks.append((start, "\n".join(lines[start - 1 : number - 1])))
                start = None
    return blocks


def python_sources() -> list[Path]:
    files = [
        p
        for folder in ("rlhf_ray", "actors", "bench")
        if (REPO / folder).is_dir()
        for p in sorted((REPO / folder).rglob("*.py"))
    ]
    return files + [REPO / "data" / "make_demo.py"]


# The one module that calls DeepSpeed's load_checkpoint, with its file reads swapped for the weights-only loader.
SAFE_DEEPSPEED_LOADER = REPO / "rlhf_ray" / "models" / "safe_load.py"


def scan_project() -> list[Finding]:
    findings = []
    for path in python_sources():
        found = scan_python(path.read_text(), str(path.relative_to(REPO)))
        findings += [f for f in found if not (path == SAFE_DEEPSPEED_LOADER and f.rule == "deepspeed_load")]
    for path in [*sorted((REPO / "configs").glob("*.yaml")), REPO / "Makefile"]:
        findings += scan_text(path.read_text(), str(path.relative_to(REPO)))
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for start, block in readme_commands(path.read_text()):
            findings += scan_text(block, str(path.relative_to(REPO)), start)
    return findings


# ---- the scanner itself: every rule fires on a snippet that breaks it ----

VIOLATIONS = [
    ("trust_remote_code", "AutoModel.from_pretrained(path, trust_remote_code=True)"),
    ("trust_remote_code", "load(path, **{'trust_remote_code': True})"),
    ("torch_load", "state = torch.load(path)"),
    ("torch_load", "state = torch.load(path, weights_only=False)"),
    ("torch_load", "from torch import load as tload\nstate = tload(path, map_location='cpu')"),
    ("deepspeed_load", "engine.load_checkpoint(folder, tag='step')"),
    ("safe_serialization", "model.save_pretrained(folder, safe_serialization=False)"),
    ("tune_restore", "tuner = tune.Tuner.restore(str(experiment), trainable=run_trial)"),
    ("yaml_load", "config = yaml.load(text, Loader=yaml.Loader)"),
    ("any_address", "serve(host='0.0.0.0')"),
    ("dashboard_host", "ray.init(include_dashboard=True, dashboard_host='0.0.0.0')"),
    ("dashboard_host", "ray.init(dashboard_host=host)"),
    ("dashboard_host", "subprocess.run(['ray', 'start', '--head', '--dashboard-host', host])"),
    ("dashboard_host", "COMMAND = 'ray start --head --dashboard-host=10.0.0.5'"),
]


@pytest.mark.parametrize("rule, snippet", VIOLATIONS, ids=[f"{rule}: {snippet[:40]}" for rule, snippet in VIOLATIONS])
def test_scanner_reports_a_violation(rule, snippet):
    source = "\n\n" + snippet + "\n"  # the violation sits on the last line
    findings = scan_python(source, "snippet.py")
    assert any(f.rule == rule for f in findings), findings
    assert all(f.where.startswith("snippet.py:") for f in findings)
    assert f"snippet.py:{len(source.splitlines())}" in {f.where for f in findings if f.rule == rule}


def test_scanner_accepts_the_safe_forms():
    safe = """
import ray, torch, yaml
model = AutoModel.from_pretrained(path, trust_remote_code=config.model.trust_remote_code, use_safetensors=True)
state = torch.load(path, weights_only=True)
model.save_pretrained(folder)
model.save_pretrained(folder, safe_serialization=True)
config = yaml.safe_load(text)
ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1")
ray.init(address=address)
subprocess.run(["ray", "start", "--head", "--dashboard-host", "127.0.0.1"])
"""
    assert scan_python(safe, "safe.py") == []


def test_text_scan_of_commands():
    text = "```bash\nray start --head --dashboard-host 0.0.0.0\nray start --head --dashboard-host 127.0.0.1\n```\n"
    ((start, block),) = readme_commands(text)
    findings = scan_text(block, "README.md", start)
    assert {(f.where, f.rule) for f in findings} == {("README.md:2", "any_address"), ("README.md:2", "dashboard_host")}
    assert scan_text("# Launch: `ray start --head --dashboard-host 127.0.0.1`, then", "c.yaml") == []
    assert [f.rule for f in scan_text("# `ray start --head --dashboard-host 10.0.0.5`, then", "c.yaml")] == [
        "dashboard_host"
    ]


# ---- the project ----


@pytest.fixture(scope="module")
def project_findings() -> list[Finding]:
    return scan_project()


def test_the_scan_covers_the_sources():
    names = {str(p.relative_to(REPO)) for p in python_sources()}
    assert {"rlhf_ray/cli.py", "rlhf_ray/models/loading.py", "actors/policy_learner.py", "data/make_demo.py"} <= names


@pytest.mark.parametrize("rule", RULES)
def test_project_sources_follow_the_rule(project_findings, rule):
    broken = [str(f) for f in project_findings if f.rule == rule]
    assert not broken, "\n".join(broken)


def test_trust_remote_code_is_off_by_default_and_in_every_shipped_config():
    from rlhf_ray.config import ModelConfig, load_config

    assert ModelConfig().trust_remote_code is False
    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        assert load_config(path).model.trust_remote_code is False, path


@pytest.mark.component
def test_tiny_model_is_written_as_safetensors(tiny_model_dir):
    files = {p.name for p in tiny_model_dir.iterdir()}
    assert "model.safetensors" in files, files
    assert not [name for name in files if name.endswith((".bin", ".pt", ".pth", ".pkl"))], files
