"""Resume never unpickles code: a real DeepSpeed checkpoint loads through the weights-only reader, and a
pickle planted in it (one that runs a shell command) is refused without running, while DeepSpeed's own
loader, on the same folder, runs it. On the same small engines: a step whose gradients are not finite
changes nothing."""

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


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_a_finite_loss_with_nonfinite_gradients_leaves_weights_and_optimizer_state_unchanged(zero_stage):
    """The SFT/RM step: a loss that is finite while a gradient is NaN (as an overflow in backward gives) applies no
    update on either DeepSpeed path (stage 0's plain optimizer, which the worker checks itself, and ZeRO's), and the
    next good step applies as usual."""
    from rlhf_ray.train.worker import step_unless_nonfinite

    engine = small_engine(zero_stage)
    backward_of_a_finite_loss(engine, nan_gradient=False)
    assert step_unless_nonfinite(engine)
    trained = [p for p in engine.module.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trained]
    moments = {k: v.clone() for k, v in adam_state(engine).items()}
    backward_of_a_finite_loss(engine, nan_gradient=True)
    assert not step_unless_nonfinite(engine)
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, trained))
    assert all(torch.equal(moments[k], v) for k, v in adam_state(engine).items())
    backward_of_a_finite_loss(engine, nan_gradient=False)
    assert step_unless_nonfinite(engine)
    assert not all(torch.equal(a, p.detach()) for a, p in zip(before, trained))
    assert all(bool(torch.isfinite(p).all()) for p in trained)


def backward_of_a_finite_loss(engine, nan_gradient: bool) -> None:
    """One micro-batch's backward with a finite loss; with `nan_gradient`, every gradient it yields is NaN."""
    out = engine(torch.ones(2, 8))
    if nan_gradient:
        out.register_hook(lambda grad: grad * float("nan"))
    loss = out.sum()
    assert bool(torch.isfinite(loss))
    engine.backward(loss)


def adam_state(engine) -> dict[str, torch.Tensor]:
    """Every tensor of the optimizer state, keyed by parameter and name (ZeRO keeps it in flat partitions)."""
    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)
    return {
        f"{i}.{name}": value
        for i, state in enumerate(optimizer.state.values())
        for name, value in state.items()
        if torch.is_tensor(value)
    }
