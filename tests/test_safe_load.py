"""Resume never unpickles code: a real DeepSpeed checkpoint loads through the weights-only reader, and a
pickle planted in it (one that runs a shell command) is refused without running, while DeepSpeed's own
loader, on the same folder, runs it."""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.models.learner_backend import start_deepspeed
from rlhf_ray.models.safe_load import UnsafeCheckpoint, load_deepspeed_checkpoint, weights_only_load
from tests.faults import plant_pickle

pytestmark = pytest.mark.component


def small_engine(zero_stage: int):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
    model[0].requires_grad_(False)  # frozen, as the LoRA base is
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "train_batch_size": 2,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"torch_adam": True, "lr": 1e-2}},
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": False},
    }
    return start_deepspeed(model, [p for p in model.parameters() if p.requires_grad], config)


def one_step(engine) -> None:
    engine.backward(engine(torch.ones(2, 8)).sum())
    engine.step()


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_a_real_deepspeed_checkpoint_loads_through_the_weights_only_reader(tmp_path, zero_stage):
    saved = small_engine(zero_stage)
    one_step(saved)
    saved.save_checkpoint(str(tmp_path), tag="t", exclude_frozen_parameters=True)
    expected = {k: v.clone() for k, v in saved.module.state_dict().items()}

    fresh = small_engine(zero_stage)
    load_deepspeed_checkpoint(fresh, tmp_path, tag="t", load_module_strict=False)
    assert fresh.global_steps == 1
    for name, value in fresh.module.state_dict().items():
        assert torch.equal(value, expected[name]), name
    one_step(fresh)  # the restored optimizer state is usable


def test_a_planted_pickle_is_refused_unrun_where_deepspeeds_loader_runs_it(tmp_path):
    engine = small_engine(2)
    one_step(engine)
    engine.save_checkpoint(str(tmp_path / "ckpt"), tag="t", exclude_frozen_parameters=True)
    (optimizer_file,) = (tmp_path / "ckpt" / "t").glob("*optim_states.pt")
    marker = tmp_path / "the-pickle-ran"
    plant_pickle(optimizer_file, marker)

    with pytest.raises(UnsafeCheckpoint) as refused:
        load_deepspeed_checkpoint(small_engine(2), tmp_path / "ckpt", tag="t", load_module_strict=False)
    message = str(refused.value)
    assert str(optimizer_file) in message and "posix.system" in message and "Nothing in it was run" in message
    assert not marker.exists()

    # the control: DeepSpeed's own load_checkpoint runs the planted command (so the refusal above is real)
    try:
        small_engine(2).load_checkpoint(str(tmp_path / "ckpt"), tag="t", load_module_strict=False)
    except Exception:  # (what it unpickled is not an optimizer state; the command has run by then)
        pass
    assert marker.exists()


def test_weights_only_load_reads_tensors_and_refuses_code(tmp_path):
    torch.save({"rng": torch.get_rng_state(), "step": 3}, tmp_path / "good.pt")
    assert weights_only_load(tmp_path / "good.pt")["step"] == 3
    marker = tmp_path / "ran"
    plant_pickle(tmp_path / "bad.pt", marker)
    with pytest.raises(UnsafeCheckpoint, match="bad.pt: refused to load"):
        weights_only_load(tmp_path / "bad.pt")
    assert not marker.exists()
