import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

LIGHT_MODULES = ["rlhf_ray", "rlhf_ray.algo.losses", "rlhf_ray.algo.ppo", "rlhf_ray.config", "rlhf_ray.formats.load",
                 "rlhf_ray.tokenization", "rlhf_ray.models", "rlhf_ray.cli"]


@pytest.mark.parametrize("module", LIGHT_MODULES)
def test_library_imports_without_ray_deepspeed_vllm(module):
    code = (f"import sys, {module}\n"
            "heavy = sorted(m for m in ('ray', 'deepspeed', 'vllm') if m in sys.modules)\n"
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"importing {module} imported {out}"
