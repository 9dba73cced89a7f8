"""The step guard (issue 10) and the windowed loss read-back with fused AdamW (issue 12): a non-finite step is
never applied, the default stops naming its steps and samples, and the losses logged are those of every step."""

from __future__ import annotations

import json
import math

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

from train.guard import StepGuard, supports_found_inf
from train.loop import train_step
from train.loss_log import read_losses
from train.prior import PriorObjective

WEIGHTS = "diffusion_pytorch_model.safetensors"


class SquareObjective:
    """A loss of the module on a batch; `poison` multiplies it (NaN: a non-finite step)."""

    poison = 1.0

    def loss(self, module: torch.nn.Module, batch: dict) -> torch.Tensor:
        return module(batch["x"]).square().mean() * self.poison  # scalar


def prepared(kind: str, accumulation: int = 1):
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=kind == "fused", foreach=kind == "foreach")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    module, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    return accelerator, model, module, optimizer, scheduler


def batches(n: int) -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    return [{"x": torch.randn(2, 4, generator=generator), "__keys__": [f"s.tar:{i}a", f"s.tar:{i}b"]}
            for i in range(n)]


@pytest.mark.parametrize("kind", ["fused", "single"])
def test_a_non_finite_step_is_never_applied(kind, monkeypatch):
    accelerator, model, module, optimizer, scheduler = prepared(kind)
    guard = StepGuard(accelerator, optimizer)
    assert guard.on_device == (kind == "fused") == supports_found_inf(optimizer)
    objective = SquareObjective()
    data = batches(4)
    for step, batch in enumerate(data[:2], start=1):
        train_step(accelerator, module, objective, batch, optimizer, scheduler, 1.0, guard)
        guard.end_step(step, 0.1)
    before = [p.detach().clone() for p in model.parameters()]
    state_before = {k: v.clone() for k, v in optimizer.state_dict()["state"][0].items()}
    objective.poison = float("nan")
    if kind == "fused":  # the fused path decides on the device: no host sync in the step
        monkeypatch.setattr(torch.Tensor, "item", lambda self: pytest.fail("host sync in a guarded fused step"))
    train_step(accelerator, module, objective, data[2], optimizer, scheduler, 1.0, guard)
    monkeypatch.undo()
    guard.end_step(3, 0.1)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # weights untouched
    state = optimizer.state_dict()["state"][0]
    assert all(torch.equal(state[k], state_before[k]) for k in state)  # moments and step count too
    objective.poison = 1.0
    train_step(accelerator, module, objective, data[3], optimizer, scheduler, 1.0, guard)  # training goes on
    guard.end_step(4, 0.1)
    results = guard.read()
    assert [r.step for r in results] == [1, 2, 3, 4] and [r.finite for r in results] == [True, True, False, True]
    assert math.isnan(results[2].loss) and results[2].keys == ("s.tar:2a", "s.tar:2b")
    assert all(torch.isfinite(p).all() for p in model.parameters()) and guard.read() == []


def test_an_infinite_gradient_with_a_finite_loss_is_caught():
    accelerator, model, module, optimizer, scheduler = prepared("fused")
    guard = StepGuard(accelerator, optimizer)
    before = [p.detach().clone() for p in model.parameters()]
    hook = model.weight.register_hook(lambda grad: grad * float("inf"))
    loss = train_step(accelerator, module, SquareObjective(), batches(1)[0], optimizer, scheduler, 1.0, guard)
    hook.remove()
    guard.end_step(1, 0.1)
    assert torch.isfinite(loss) and not guard.read()[0].finite
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_the_read_back_adds_losses_as_the_loop_always_did():
    """Window values equal the old per-micro-batch `.item()` sums, with accumulation, bit for bit."""
    accelerator, model, module, optimizer, scheduler = prepared("fused", accumulation=3)
    guard = StepGuard(accelerator, optimizer)
    expected, step_loss, step = [], 0.0, 0
    for batch in batches(9):
        loss = train_step(accelerator, module, SquareObjective(), batch, optimizer, scheduler, 1.0, guard)
        step_loss += loss.item() / 3  # what the loop did at every micro-batch before the window
        if accelerator.sync_gradients:
            step += 1
            guard.end_step(step, 0.1)
            expected.append(step_loss)
            step_loss = 0.0
            if step == 2:
                first = guard.read()
    assert [r.loss for r in first + guard.read()] == expected


def test_fused_and_single_tensor_adamw_agree():
    trained = {}
    for kind in ("fused", "single", "foreach"):
        accelerator, model, module, optimizer, scheduler = prepared(kind)
        for batch in batches(5):
            train_step(accelerator, module, SquareObjective(), batch, optimizer, scheduler, 1.0)
        trained[kind] = [p.detach().clone() for p in model.parameters()]
    for kind in ("single", "foreach"):
        for p, q in zip(trained["fused"], trained[kind]):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# --- the loop: policies, windows, flags -------------------------------------------------------------------


class Poisoned(PriorObjective):
    """The loss of optimisation step `at` (1-based, one micro-batch per step) is NaN; records every micro-batch."""

    at, values, keys = 3, [], []

    def loss(self, module, batch):
        loss = super().loss(module, batch)
        Poisoned.values.append(loss.item())
        Poisoned.keys.append(batch["__keys__"])
        return loss * float("nan") if len(Poisoned.values) == Poisoned.at else loss


def poisoned(train_prior, out, cache, *flags):
    Poisoned.values, Poisoned.keys = [], []
    return train_prior(out, cache, "--max_train_steps", "6", "--checkpointing_steps", "2", *flags,
                       objective_class=Poisoned)


def test_non_finite_step_stops_the_job_naming_steps_and_samples(train_prior, tiny_cache, tmp_path):
    from train.guard import Stopped

    with pytest.raises(Stopped) as stopped:
        poisoned(train_prior, tmp_path, tiny_cache, "--logging_steps", "3")
    message = str(stopped.value)
    assert message.startswith("non-finite loss or gradient norm at step(s) 3 (read back after steps 3-3)")
    assert ", ".join(Poisoned.keys[2]) in message and len(Poisoned.values) == 3  # stopped at the read-back
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]  # nothing saved after it
    assert not (tmp_path / "prior").exists()
    assert [step for step, _ in read_losses(tmp_path, 3)] == [1, 2, 3]


def test_skip_trains_on_and_counts_with_finite_weights(train_prior, tiny_cache, tmp_path):
    summary = poisoned(train_prior, tmp_path, tiny_cache, "--on_nonfinite", "skip")
    assert summary["nonfinite_steps"] == [3] and summary["global_step"] == 6
    assert math.isnan(summary["losses"][2]) and all(math.isfinite(x) for i, x in enumerate(summary["losses"]) if i != 2)
    assert json.loads((tmp_path / "checkpoint-4" / "train_state.json").read_text()) == {
        "global_step": 4, "nonfinite_steps": [3]}
    for path in (tmp_path / "prior" / WEIGHTS, tmp_path / "checkpoint-4" / "prior" / WEIGHTS):
        assert all(torch.isfinite(t).all() for t in load_file(str(path)).values())


def test_windowed_logging_records_every_steps_value(train_prior, tiny_cache, tmp_path):
    Poisoned.at = -1  # no NaN: record the micro-batch losses as the old loop read them
    flags = ("--max_train_steps", "5", "--gradient_accumulation_steps", "2", "--logging_steps", "4")
    try:
        Poisoned.values, Poisoned.keys = [], []
        summary = train_prior(tmp_path / "a", tiny_cache, *flags, objective_class=Poisoned)
    finally:
        Poisoned.at = 3
    expected = []
    for i in range(0, 10, 2):  # the old loop's arithmetic on each micro-batch's float
        step_loss = 0.0
        for value in Poisoned.values[i:i + 2]:
            step_loss += value / 2
        expected.append(step_loss)
    assert summary["losses"] == expected
    assert [loss for _, loss in read_losses(tmp_path / "a", 5)] == expected
    every = train_prior(tmp_path / "b", tiny_cache, *flags[:4], "--logging_steps", "1", "--adam_implementation",
                        "single")
    assert all(math.isclose(a, b, rel_tol=1e-4) for a, b in zip(every["losses"], expected, strict=True))
