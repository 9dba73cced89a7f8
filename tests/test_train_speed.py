"""Issue 12, fast at every batch size: `--torch_compile` trains the prior like eager, with a bounded number of
compiled graphs. (Fused vs default AdamW and the windowed read-back: tests/test_train_guard.py.)"""

from __future__ import annotations

import math

import pytest
import torch

from train.compile import compiled_graphs
from train.prior import PriorObjective


class Lengths(PriorObjective):
    """Records the text length of every training batch (the trimmed prior's sequence length)."""

    seen: list[int] = []

    def loss(self, module, batch):
        Lengths.seen.append(int(batch["text_mask"].shape[1]))
        return super().loss(module, batch)


@pytest.mark.slow
def test_torch_compile_trains_the_prior_like_eager_with_at_most_two_graphs(train_prior, tiny_cache, tmp_path):
    """--torch_compile: the same losses (to float tolerance: fused kernels round differently) over batches of
    several text lengths, compiled once static and once with a dynamic length, never once per length."""
    flags = ("--max_train_steps", "8", "--train_batch_size", "1", "--length_bucket_batches", "0")  # lengths vary
    eager = train_prior(tmp_path / "eager", tiny_cache, *flags)
    torch._dynamo.reset()
    Lengths.seen = []
    before = compiled_graphs()
    try:
        compiled = train_prior(tmp_path / "compiled", tiny_cache, *flags, "--torch_compile", objective_class=Lengths)
        graphs = compiled_graphs() - before
    finally:
        torch._dynamo.reset()
    assert len(set(Lengths.seen)) >= 3  # the test exercises changing shapes
    assert 1 <= graphs <= 2
    assert all(math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6)
               for a, b in zip(eager["losses"], compiled["losses"], strict=True))
