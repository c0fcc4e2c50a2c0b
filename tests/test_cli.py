import subprocess
import sys

import pytest

from rlhf_ray.cli import main

pytestmark = pytest.mark.unit


def test_help_lists_commands():
    out = subprocess.run(
        [sys.executable, "-m", "rlhf_ray.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("config", "data", "models"):
        assert command in out


def test_config_show_applies_overrides(capsys):
    assert main(["config", "show", "configs/demo.yaml", "ppo.kl_coef=0.125"]) == 0
    assert "kl_coef: 0.125" in capsys.readouterr().out


def test_config_show_bad_key_is_a_clean_error(capsys):
    assert main(["config", "show", "configs/demo.yaml", "ppo.kl_coeff=0.1"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'ppo.kl_coeff'" in err and "Traceback" not in err


@pytest.mark.component
def test_data_inspect_demo_pairs(tiny_model_dir, capsys):
    assert (
        main(["data", "inspect", "data/demo/pairs.jsonl", "--tokenizer", str(tiny_model_dir), "--max-length", "64"])
        == 0
    )
    out = capsys.readouterr().out
    assert "format: pairs" in out and "rows read: 400" in out and "valid preference examples: 400" in out
    assert "longest_total" in out and "over max_length 64:" in out and "problems: no problems" in out


def test_data_inspect_missing_file(capsys):
    assert main(["data", "inspect", "nope.jsonl", "--tokenizer", "nope-model"]) == 2
    assert "rlhf-ray: error:" in capsys.readouterr().err


@pytest.mark.component
def test_data_inspect_real_hh_rlhf(tiny_model_dir, capsys):
    from tests.conftest import shared_file

    path = shared_file("hh-rlhf/helpful-online/test.jsonl.gz")
    assert main(["data", "inspect", str(path), "--format", "hh-rlhf", "--tokenizer", str(tiny_model_dir)]) == 0
    out = capsys.readouterr().out
    assert "rows read: 1137" in out and "valid preference examples: 1129" in out
    assert "2 x rejected: identical to 'chosen'" in out and "test.jsonl.gz:199" in out
