"""`train.loop.train_step`: one micro-batch as the loop runs it (the benchmark times the same function)."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from train.loop import train_step


class SquareObjective:
    """The part of an objective `train_step` uses: a loss of the module on a batch."""

    def loss(self, module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return module(batch["x"]).square().mean()  # scalar


def test_train_step_accumulates_clips_and_steps_once_per_optimisation_step():
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    module, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    batches = [{"x": 100 * torch.randn(2, 4)} for _ in range(2)]  # large: the gradient norm exceeds the clip
    before = [p.detach().clone() for p in model.parameters()]

    first = train_step(accelerator, module, SquareObjective(), batches[0], optimizer, scheduler, max_grad_norm=1.0)
    assert not accelerator.sync_gradients and not first.requires_grad and first.ndim == 0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # accumulating: no step yet
    assert scheduler.get_last_lr() == [0.1]

    reference = [p.clone().requires_grad_() for p in before]  # one clipped SGD step on the mean of both losses
    loss = sum(torch.nn.functional.linear(b["x"], *reference).square().mean() for b in batches) / 2
    loss.backward()
    torch.nn.utils.clip_grad_norm_(reference, 1.0)
    expected = [p.detach() - 0.1 * p.grad for p in reference]

    train_step(accelerator, module, SquareObjective(), batches[1], optimizer, scheduler, max_grad_norm=1.0)
    assert accelerator.sync_gradients
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e)
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())  # zeroed for the next step
    assert scheduler.get_last_lr() == [0.05]  # one scheduler step per optimisation step
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
