"""train/clip.py: clipping folded into fused AdamW's kernel gives clip_grad_norm_'s step (to one ulp)."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

import train.step as step_module
from train.clip import clip_gradients, folds
from train.loop import train_step

STEPS = 4


class SquareObjective:
    def loss(self, module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return module(batch["x"]).square().mean()  # scalar


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))


def accelerator() -> Accelerator:
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return Accelerator(cpu=True)


def batches(scale: float) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [{"x": scale * torch.randn(5, 8, generator=generator)} for _ in range(STEPS)]


def reference_run(data: list[dict], max_norm: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """What the reference scripts do: clip_grad_norm_ (a scaling pass), then the fused AdamW step."""
    net = model()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2, fused=True)
    norms = []
    for batch in data:
        SquareObjective().loss(net, batch).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm))
        optimizer.step()
        optimizer.zero_grad()
    return [p.detach() for p in net.parameters()], norms


def lean_run(data: list[dict], max_norm: float, monkeypatch) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The loop's train_step with fused AdamW: the clip goes into the kernel, accelerate's clip is never called."""
    acc = accelerator()
    net = model()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    module, optimizer, scheduler = acc.prepare(net, optimizer, scheduler)
    assert folds(acc, optimizer)
    monkeypatch.setattr(acc, "clip_grad_norm_", lambda *a, **k: pytest.fail("clipped outside the fused kernel"))
    norms = []
    real = step_module.clip_gradients
    monkeypatch.setattr(step_module, "clip_gradients", lambda *a: norms.append(real(*a)) or norms[-1])
    for batch in data:
        train_step(acc, module, SquareObjective(), batch, optimizer, scheduler, max_norm)
    return [p.detach() for p in net.parameters()], norms


def test_a_clipped_step_equals_clip_grad_norm_then_fused_adamw_to_one_ulp(monkeypatch):
    data = batches(scale=100.0)  # gradient norms far above 1: every step clips
    expected, expected_norms = reference_run(data, max_norm=1.0)
    got, norms = lean_run(data, max_norm=1.0, monkeypatch=monkeypatch)
    assert all(n > 1.0 for n in expected_norms)
    assert torch.equal(norms[0], expected_norms[0])  # same norm, computed the same way, from the same gradients
    for p, e in zip(got, expected):
        torch.testing.assert_close(p, e, rtol=1e-6, atol=1e-7)


def test_an_unclipped_step_is_bitwise_the_reference_step(monkeypatch):
    data = batches(scale=0.01)
    expected, expected_norms = reference_run(data, max_norm=1e6)
    got, norms = lean_run(data, max_norm=1e6, monkeypatch=monkeypatch)
    assert all(torch.equal(n, e) for n, e in zip(norms, expected_norms))
    assert all(torch.equal(p, e) for p, e in zip(got, expected))  # grad_scale 1.0: g / 1 == g


@pytest.mark.parametrize("kind", ["foreach", "single", "sgd"])
def test_other_optimizers_clip_with_accelerate_as_before(kind):
    acc = accelerator()
    net = model()
    if kind == "sgd":
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    else:
        optimizer = torch.optim.AdamW(net.parameters(), lr=0.1, foreach=kind == "foreach")
    module, optimizer = acc.prepare(net, optimizer)
    assert not folds(acc, optimizer)
    SquareObjective().loss(module, batches(100.0)[0]).backward()
    grads = [p.grad.clone() for p in net.parameters()]
    norm = clip_gradients(acc, module.parameters(), optimizer, 1.0)
    coef = 1.0 / (norm + 1e-6)
    assert all(torch.equal(p.grad, g * coef) for p, g in zip(net.parameters(), grads))  # scaled in place
    assert getattr(optimizer.optimizer, "grad_scale", None) is None
