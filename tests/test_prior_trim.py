"""The trimmed prior forward gives diffusers' 77-token results; length bucketing keeps padding low."""

from __future__ import annotations

import copy
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import DDPMScheduler, PriorTransformer  # noqa: E402

from train.order import length_bucketed  # noqa: E402
from train.prior_trim import TrimmedPrior, pad_to_longest, trimmed_prior_forward  # noqa: E402

TEXT_POSITIONS = 77  # the tokenizer's model_max_length = the prior's num_embeddings
TINY = dict(num_attention_heads=2, attention_head_dim=16, num_layers=2, embedding_dim=32)
LARGER = dict(num_attention_heads=4, attention_head_dim=16, num_layers=4, embedding_dim=64)
RTOL = 1e-5  # fp32 equivalence bound from the issue, relative to the tensor's largest entry


def make_prior(seed: int = 0, **config) -> PriorTransformer:
    """A random prior; the zero-initialised embeddings are randomised so that they matter."""
    torch.manual_seed(seed)
    config = {"num_embeddings": TEXT_POSITIONS, "additional_embeddings": 4, **config}
    prior = PriorTransformer(**config)
    with torch.no_grad():
        prior.positional_embedding.normal_(0.0, 0.5)
        if prior.prd_embedding is not None:
            prior.prd_embedding.normal_(0.0, 0.5)
        prior.clip_mean.normal_(0.0, 0.2)
        prior.clip_std.uniform_(0.5, 1.5)
    return prior


def make_batch(prior: PriorTransformer, lengths: list[int], junk: bool, seed: int = 1) -> dict:
    """A 77-padded batch (junk or zeros in the padding, as a text encoder would or would not give) and its trim."""
    gen = torch.Generator().manual_seed(seed)
    dim = prior.config.embedding_dim
    proj_dim = prior.config.embedding_proj_dim or dim
    batch_size = len(lengths)
    mask = torch.arange(TEXT_POSITIONS)[None, :] < torch.tensor(lengths)[:, None]  # [B, 77]
    text = torch.randn(batch_size, TEXT_POSITIONS, dim, generator=gen)  # [B, 77, H]
    padding = 3.0 * torch.randn(text.shape, generator=gen) if junk else torch.zeros_like(text)
    text = torch.where(mask[..., None], text, padding)
    longest = max(lengths)
    return dict(
        hidden_states=torch.randn(batch_size, dim, generator=gen),  # [B, E]
        timestep=torch.randint(0, 1000, (batch_size,), generator=gen),  # [B]
        proj_embedding=torch.randn(batch_size, proj_dim, generator=gen),  # [B, E]
        full_text=text,
        full_mask=mask,
        text=text[:, :longest].clone(),  # [B, L, H]
        mask=mask[:, :longest].clone(),  # [B, L]
    )


def full_forward(prior: PriorTransformer, b: dict) -> torch.Tensor:
    return prior(
        b["hidden_states"], b["timestep"], b["proj_embedding"], b["full_text"], b["full_mask"]
    ).predicted_image_embedding


def trimmed_forward(prior: PriorTransformer, b: dict, **kwargs) -> torch.Tensor:
    return trimmed_prior_forward(
        prior, b["hidden_states"], b["timestep"], b["proj_embedding"], b["text"], b["mask"], **kwargs
    )


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach(), expected.detach()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def output_and_grads(prior: PriorTransformer, forward, b: dict, **kwargs) -> tuple[torch.Tensor, dict]:
    prior.zero_grad(set_to_none=True)
    out = forward(prior, b, **kwargs)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))  # a generic loss direction
    (out * cotangent).sum().backward()
    grads = {n: p.grad.clone() for n, p in prior.named_parameters() if p.grad is not None}
    return out.detach(), grads


def assert_same_grads(actual: dict, expected: dict) -> None:
    """Each parameter's gradient within RTOL of its largest entry; the key biases' true gradient is 0.

    A key bias adds the same q·b to every score of a query's row and softmax ignores such shifts, so
    its gradient is rounding noise (~1e-8) in both forwards: compare it to the largest gradient overall.
    """
    assert actual.keys() == expected.keys()
    largest = max(float(g.abs().max()) for g in expected.values())
    for name, grad in expected.items():
        if name.endswith("attn1.to_k.bias"):
            assert float(actual[name].abs().max()) <= RTOL * largest, name
            assert float(grad.abs().max()) <= RTOL * largest, name
        else:
            assert rel_err(actual[name], grad) <= RTOL, name


LENGTH_SETS = [
    [2, 77, 13, 25, 9, 40],  # longest caption is 77: nothing is trimmed, the shortest has start + end only
    [2, 14, 9, 21, 17, 2],  # typical captions: L = 21 of 77
    [2, 2, 2],  # start + end tokens only
]


@pytest.mark.parametrize("size", [TINY, LARGER], ids=["tiny", "larger"])
@pytest.mark.parametrize("junk", [True, False], ids=["junk_padding", "zero_padding"])
@pytest.mark.parametrize("lengths", LENGTH_SETS, ids=["max77", "typical", "len2"])
def test_output_and_gradients_match_full_forward(size, junk, lengths):
    prior = make_prior(**size)
    batch = make_batch(prior, lengths, junk)
    expected, expected_grads = output_and_grads(prior, full_forward, batch)
    actual, actual_grads = output_and_grads(prior, trimmed_forward, batch)
    assert actual.shape == expected.shape
    assert rel_err(actual, expected) <= RTOL
    assert_same_grads(actual_grads, expected_grads)
    longest = max(lengths)
    for grads in (expected_grads, actual_grads):  # padded positions' embeddings get exactly nothing
        assert torch.all(grads["positional_embedding"][:, longest:TEXT_POSITIONS] == 0)
        assert "clip_mean" not in grads and "clip_std" not in grads


def test_random_lengths_match_full_forward():
    prior = make_prior(**TINY)
    rng = random.Random(3)
    for seed in range(4):
        lengths = [rng.randint(2, 77) for _ in range(5)]
        batch = make_batch(prior, lengths, junk=True, seed=seed)
        assert rel_err(trimmed_forward(prior, batch), full_forward(prior, batch)) <= RTOL


@pytest.mark.parametrize(
    "variant",
    [
        dict(norm_in_type="layer", embedding_proj_norm_type="layer"),
        dict(added_emb_type=None, additional_embeddings=3),
        dict(encoder_hid_proj_type=None),  # text hidden size = inner_dim (2 * 16 = 32)
        dict(embedding_proj_dim=24, clip_embed_dim=40, time_embed_dim=48, time_embed_act_fn="gelu"),
    ],
    ids=["norms", "no_prd", "no_text_proj", "other_dims"],
)
def test_config_variants_match_full_forward(variant):
    prior = make_prior(**TINY, **variant)
    batch = make_batch(prior, [2, 11, 18], junk=True)
    expected, expected_grads = output_and_grads(prior, full_forward, batch)
    actual, actual_grads = output_and_grads(prior, trimmed_forward, batch)
    assert actual.shape == expected.shape
    assert rel_err(actual, expected) <= RTOL
    assert_same_grads(actual_grads, expected_grads)


def test_scalar_timestep_matches_full_forward():
    prior = make_prior(**TINY)
    batch = make_batch(prior, [5, 12], junk=True)
    for timestep in (17, torch.tensor(17)):
        batch["timestep"] = timestep
        assert rel_err(trimmed_forward(prior, batch), full_forward(prior, batch)) <= RTOL


def count_block_calls(prior: PriorTransformer) -> list[int]:
    calls = [0]
    for block in prior.transformer_blocks:
        # a pre-hook: non-reentrant checkpointing stops its recomputation early, before forward hooks run
        block.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("via_attribute", [False, True], ids=["argument", "prior_attribute"])
def test_gradient_checkpointing_recomputes_blocks_and_gives_same_grads(via_attribute):
    prior = make_prior(**TINY)
    batch = make_batch(prior, [3, 19, 8], junk=True)
    expected, expected_grads = output_and_grads(prior, trimmed_forward, batch)
    calls = count_block_calls(prior)
    if via_attribute:
        prior.gradient_checkpointing = True  # what a diffusers version supporting it would set
        actual, actual_grads = output_and_grads(prior, trimmed_forward, batch)
    else:
        actual, actual_grads = output_and_grads(prior, trimmed_forward, batch, gradient_checkpointing=True)
    assert calls[0] == 2 * len(prior.transformer_blocks)  # forward + recomputation in backward
    assert rel_err(actual, expected) <= RTOL
    assert_same_grads(actual_grads, expected_grads)


@pytest.mark.parametrize("mode", ["autocast", "bf16_weights"])
def test_bfloat16_matches_full_forward_at_bf16_precision(mode):
    prior = make_prior(**TINY)
    batch = make_batch(prior, [2, 15, 9], junk=True)
    if mode == "bf16_weights":
        prior = prior.to(torch.bfloat16)
        batch = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in batch.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
        expected = full_forward(prior, batch)
        actual = trimmed_forward(prior, batch)
    assert actual.dtype == expected.dtype == torch.bfloat16
    assert rel_err(actual.float(), expected.float()) <= 2e-2  # a few bf16 ulps: accumulation order differs


def test_unsupported_inputs_raise_value_error():
    prior = make_prior(**TINY)
    b = make_batch(prior, [4, 6], junk=False)
    args = (b["hidden_states"], b["timestep"], b["proj_embedding"])
    with pytest.raises(ValueError, match="attention_mask"):
        trimmed_prior_forward(prior, *args, b["text"], None)
    with pytest.raises(ValueError, match="does not match"):
        trimmed_prior_forward(prior, *args, b["text"], b["mask"][:, :3])
    with pytest.raises(ValueError, match="num_embeddings"):
        trimmed_prior_forward(prior, *args, F.pad(b["full_text"], (0, 0, 0, 1)), F.pad(b["full_mask"], (0, 1)))
    with pytest.raises(ValueError, match="TrimmedPrior"):
        trimmed_prior_forward(TrimmedPrior(prior), *args, b["text"], b["mask"])
    with pytest.raises(ValueError, match="additional_embeddings"):
        odd = make_prior(**TINY, added_emb_type=None, additional_embeddings=4)
        trimmed_prior_forward(odd, *args, b["text"], b["mask"])


@pytest.mark.parametrize("trim_padding", [True, False])
@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_wrapper_modes_match_full_forward(trim_padding, gradient_checkpointing):
    prior = make_prior(**TINY)
    batch = make_batch(prior, [2, 9, 16], junk=False)
    wrapper = TrimmedPrior(prior, trim_padding=trim_padding, gradient_checkpointing=gradient_checkpointing)
    out = wrapper(batch["hidden_states"], batch["timestep"], batch["proj_embedding"], batch["text"], batch["mask"])
    assert rel_err(out, full_forward(prior, batch)) <= RTOL


def test_wrapper_under_ddp_gives_the_same_gradients(tmp_path):
    """DDP hooks the wrapper's forward; one gloo process checks the wiring (sync over 1 rank = identity)."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        prior = make_prior(**TINY)
        prior.clip_mean.requires_grad_(False)  # statistics, not trained (unused in forward: DDP would refuse)
        prior.clip_std.requires_grad_(False)
        reference = copy.deepcopy(prior)
        ddp = torch.nn.parallel.DistributedDataParallel(TrimmedPrior(prior))
        for step in range(2):  # a second step fails if the first one's reduction never finished
            batch = make_batch(prior, [3, 12, 7], junk=False, seed=step)
            args = (batch["hidden_states"], batch["timestep"], batch["proj_embedding"], batch["text"], batch["mask"])
            ddp.zero_grad(set_to_none=True)
            ddp(*args).square().mean().backward()
            reference.zero_grad(set_to_none=True)
            trimmed_prior_forward(reference, *args).square().mean().backward()
            for (name, p), q in zip(prior.named_parameters(), reference.parameters()):
                if p.requires_grad:
                    assert rel_err(p.grad, q.grad) <= RTOL, name
    finally:
        torch.distributed.destroy_process_group()


def test_training_losses_match_step_by_step():
    """10 AdamW steps on the reference prior objective: trimmed and 77-token forward give the same losses."""
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="sample")
    full_prior = make_prior(**TINY)
    trimmed_prior = copy.deepcopy(full_prior)
    rng = random.Random(5)
    losses = {"full": [], "trimmed": []}
    optimizers = {
        "full": torch.optim.AdamW(full_prior.parameters(), lr=1e-3),
        "trimmed": torch.optim.AdamW(trimmed_prior.parameters(), lr=1e-3),
    }
    for step in range(10):
        batch = make_batch(full_prior, [rng.randint(2, 30) for _ in range(4)], junk=True, seed=100 + step)
        gen = torch.Generator().manual_seed(step)
        image_embeds = torch.randn(batch["hidden_states"].shape, generator=gen)  # [B, E]
        target = (image_embeds - full_prior.clip_mean.detach()) / full_prior.clip_std.detach()  # [B, E]
        noise = torch.randn(target.shape, generator=gen)  # [B, E]
        batch["hidden_states"] = scheduler.add_noise(target, noise, batch["timestep"])  # [B, E]
        for name, prior, forward in (("full", full_prior, full_forward), ("trimmed", trimmed_prior, trimmed_forward)):
            loss = F.mse_loss(forward(prior, batch), target)
            optimizers[name].zero_grad()
            loss.backward()
            optimizers[name].step()
            losses[name].append(loss.item())
    np.testing.assert_allclose(losses["trimmed"], losses["full"], rtol=0, atol=1e-4)
    assert losses["full"][-1] < losses["full"][0]  # it really trained


def test_pad_to_longest():
    arrays = [np.ones((3, 4), np.float32), 2 * np.ones((5, 4), np.float32)]
    hidden, mask = pad_to_longest(arrays)
    assert hidden.shape == (2, 5, 4) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [3, 5]
    assert torch.all(hidden[0, 3:] == 0) and torch.all(hidden[0, :3] == 1) and torch.all(hidden[1] == 2)
    hidden, mask = pad_to_longest(arrays, length=TEXT_POSITIONS)
    assert hidden.shape == (2, TEXT_POSITIONS, 4) and mask.sum(1).tolist() == [3, 5]


def caption_lengths(count: int, seed: int = 0) -> list[int]:
    """A realistic token-length distribution: log-normal around ~15 tokens, clipped to [2, 77]."""
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.lognormal(np.log(15), 0.45, count)), 2, 77).astype(int).tolist()


def padded_tokens(batches: list[list[int]]) -> int:
    return sum(len(b) * max(b) - sum(b) for b in batches)


def test_length_bucketed_yields_each_sample_once_with_less_padding():
    lengths = caption_lengths(1000)
    samples = list(enumerate(lengths))  # (id, length)
    batches = list(length_bucketed(iter(samples), buffer_size=256, batch_size=32, key=lambda s: s[1], seed=0))
    assert sorted(s for b in batches for s in b) == samples
    assert [len(b) for b in batches].count(32) == len(batches) - 1  # only the final batch is short
    bucketed = padded_tokens([[s[1] for s in b] for b in batches])
    shuffled = lengths.copy()
    random.Random(0).shuffle(shuffled)
    unbucketed = padded_tokens([shuffled[i : i + 32] for i in range(0, len(shuffled), 32)])
    assert bucketed < unbucketed / 5


def test_length_bucketed_keeps_randomness():
    samples = list(enumerate(caption_lengths(256)))
    batches = list(length_bucketed(samples, buffer_size=256, batch_size=32, key=lambda s: s[1], seed=0))
    longest = [max(s[1] for s in b) for b in batches]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)  # batch order shuffled
    same_length = [(i, 10) for i in range(64)]  # ties: batches are random draws, not input chunks
    tied = list(length_bucketed(same_length, buffer_size=64, batch_size=32, key=lambda s: s[1], seed=0))
    assert sorted(s[0] for s in tied[0]) not in (list(range(32)), list(range(32, 64)))


def test_length_bucketed_drop_last_and_bad_sizes():
    batches = list(length_bucketed(range(70), buffer_size=64, batch_size=32, key=int, drop_last=True))
    assert [len(b) for b in batches] == [32, 32]
    with pytest.raises(ValueError):
        list(length_bucketed(range(10), buffer_size=16, batch_size=32, key=int))
