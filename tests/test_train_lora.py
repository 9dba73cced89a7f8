"""LoRA (--rank): the adapter is the only trained part; first loss, resume, export, merge and the documented load."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file
from test_train_decoder import decoder_flags, run_decoder

from train.config import parse_config
from train.lora import LORA_WEIGHT_NAME, add_lora
from train.prior_config import PriorTrainConfig
from train.prior_trim import TrimmedPrior

LORA = ("--rank", "4", "--lora_alpha", "8")
PROMPT = "a red circle on a blue background"


def lora_config(*flags: str) -> PriorTrainConfig:
    return parse_config(PriorTrainConfig, ["--shards", "unused", *flags])


def same_tensors(a: str, b: str) -> bool:
    left, right = load_file(a), load_file(b)
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


@pytest.mark.parametrize("flags, message", [
    (["--merge_lora"], "--merge_lora applies to a LoRA adapter: add --rank"),
    (["--lora_alpha", "8"], "--lora_alpha applies to a LoRA adapter: add --rank"),
    (["--rank", "-1"], "--rank must be >= 0"),
    (["--rank", "4", "--lora_dropout", "1"], "--lora_dropout must be in [0, 1)"),
    (["--rank", "4", "--lora_target_modules", " , "], "--lora_layers names no module"),
])
def test_lora_flags_are_refused_in_one_line(flags, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)")):
        lora_config(*flags)


def test_rank_zero_is_a_full_fine_tune(tiny_models):
    from diffusers import PriorTransformer

    prior = PriorTransformer.from_pretrained(tiny_models[0], subfolder="prior")
    assert add_lora(prior, lora_config("--rank", "0"), ["to_q"]) is prior and not hasattr(prior, "peft_config")


def unet_inputs(unet) -> tuple:
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 8, 8, generator=generator)  # [B, 4, h, w]
    image_embeds = torch.randn(2, unet.config.encoder_hid_dim, generator=generator)  # [B, E]
    return latents, torch.tensor([10, 500]), None, {"image_embeds": image_embeds}


def lora_grads(forward, model) -> list[torch.Tensor]:
    model.zero_grad()
    forward().float().pow(2).mean().backward()
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


def test_adapter_trains_alone_draws_nothing_and_runs_in_every_forward(tiny_models, one_thread):
    """Base frozen; the init leaves the seeded stream alone; trimmed forward = diffusers' forward with the
    adapter; gradient checkpointing gives the same adapter gradients (so --rank allows it)."""
    from diffusers import PriorTransformer, UNet2DConditionModel

    torch.manual_seed(0)
    expected_draw = torch.rand(3)
    torch.manual_seed(0)
    prior = add_lora(PriorTransformer.from_pretrained(tiny_models[0], subfolder="prior"), lora_config(*LORA),
                     ["to_q", "to_k", "to_v", "to_out.0"])
    assert torch.equal(torch.rand(3), expected_draw)  # PEFT's initialisation drew under a forked RNG
    trained = [name for name, p in prior.named_parameters() if p.requires_grad]
    assert trained and all(".lora_A." in name or ".lora_B." in name for name in trained)
    assert len(trained) == 2 * 4 * prior.config.num_layers  # A and B of to_q, to_k, to_v, to_out.0 per block
    for name, p in prior.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # a trained-looking adapter: the forward must change
    generator = torch.Generator().manual_seed(2)
    e, length = prior.config.embedding_dim, 5
    inputs = (torch.randn(2, e, generator=generator), torch.tensor([3, 900]), torch.randn(2, e, generator=generator),
              torch.randn(2, length, e, generator=generator), torch.tensor([[True] * length, [True] * 3 + [False] * 2]))
    trimmed = TrimmedPrior(prior, trim_padding=True)
    with torch.no_grad():
        adapted = trimmed(*inputs)  # [B, E]
        reference = TrimmedPrior(prior, trim_padding=False)(*inputs)  # diffusers' own 77-token forward
        prior.disable_adapters()
        base = trimmed(*inputs)
        prior.enable_adapters()
    torch.testing.assert_close(adapted, reference, rtol=1e-5, atol=1e-5)
    assert (adapted - base).abs().max() > 1e-3
    plain = lora_grads(lambda: trimmed(*inputs), prior)
    checkpointed = lora_grads(lambda: TrimmedPrior(prior, gradient_checkpointing=True)(*inputs), prior)
    assert all(g.abs().sum() > 0 for g in plain)
    assert all(torch.equal(a, b) for a, b in zip(plain, checkpointed))

    unet = add_lora(UNet2DConditionModel.from_pretrained(tiny_models[1], subfolder="unet"), lora_config(*LORA),
                    ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"])
    args = unet_inputs(unet)
    plain = lora_grads(lambda: unet(*args[:3], added_cond_kwargs=args[3]).sample, unet)
    unet.enable_gradient_checkpointing()
    checkpointed = lora_grads(lambda: unet(*args[:3], added_cond_kwargs=args[3]).sample, unet)
    assert plain and all(torch.equal(a, b) for a, b in zip(plain, checkpointed))


def test_unknown_target_module_is_refused_before_step_1(train_prior, tiny_cache, tmp_path):
    from train.loop import Refused

    with pytest.raises(Refused, match="--lora_layers to_q,nope"):
        train_prior(tmp_path / "out", tiny_cache, "--rank", "4", "--lora_layers", "to_q,nope", "--max_train_steps", "1")


# --- prior runs ---------------------------------------------------------------------------------------

PRIOR_STEPS = 4
PRIOR_RUN = ("--max_train_steps", str(PRIOR_STEPS), "--learning_rate", "1e-2", "--checkpointing_steps", "2", *LORA)


@pytest.fixture(scope="module")
def prior_runs(train_prior, tiny_cache, tmp_path_factory):
    """A full fine-tune's first step, and a 4-step LoRA run checkpointed every 2 steps (its export: base + adapter)."""
    root = tmp_path_factory.mktemp("prior_lora")
    full = train_prior(root / "full", tiny_cache, "--max_train_steps", "1", "--learning_rate", "1e-2")
    lora = train_prior(root / "lora", tiny_cache, *PRIOR_RUN)
    return root, full, lora


@pytest.mark.slow
def test_prior_first_loss_is_the_full_models(prior_runs):
    _, full, lora = prior_runs
    assert len(lora["losses"]) == PRIOR_STEPS
    assert lora["losses"][0] == full["losses"][0]  # zero-initialised B: exactly the base's forward, same draws


@pytest.mark.slow
def test_prior_export_is_the_base_pipeline_plus_an_adapter_that_loads_and_changes_it(prior_runs, tiny_models,
                                                                                      one_thread):
    from diffusers import KandinskyV22PriorPipeline

    root, _, _ = prior_runs
    out, base_dir = root / "lora", tiny_models[0]
    for name in os.listdir(base_dir / "prior"):  # the base trainee, copied as it is
        assert (out / "prior" / name).read_bytes() == (base_dir / "prior" / name).read_bytes()
    card = (out / "README.md").read_text()
    call = f'prior.prior.load_lora_adapter("{out}", weight_name="{LORA_WEIGHT_NAME}", prefix=None)'
    assert call in card and "- lora" in card and "| `--rank` | 4 |" in card
    assert not [d for d in os.listdir(out / "checkpoint-4") if d in ("prior", "prior_ema")]  # no full model

    prior = KandinskyV22PriorPipeline.from_pretrained(str(out))

    def embeds():
        return prior(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).image_embeds

    base = embeds()
    prior.prior.load_lora_adapter(str(out), weight_name=LORA_WEIGHT_NAME, prefix=None)  # the card's call
    adapted = embeds()
    assert torch.isfinite(adapted).all() and not torch.allclose(adapted, base, atol=1e-4)


@pytest.mark.slow
def test_a_lora_prior_export_validates_decoders_with_its_adapter_and_is_no_trainee(prior_runs, train_prior,
                                                                                    tiny_models, tiny_cache, tmp_path,
                                                                                    one_thread):
    """A decoder's validation samples its prompts with the LoRA prior's adapter loaded (not the bare base);
    training the prior on from the export, whose prior/ is the base, is refused in one line."""
    from diffusers import KandinskyV22PriorPipeline

    from precompute import reader
    from train.decoder_validation import prompt_image_embeds
    from train.loop import Refused

    root, _, _ = prior_runs
    manifest = reader.read_manifest(str(tiny_cache))
    prompts = reader.validation_prompts(manifest)[:1]
    ours, base = (prompt_image_embeds(str(path), manifest, prompts, torch.device("cpu"), seed=0)
                  for path in (root / "lora", tiny_models[0]))
    pipe = KandinskyV22PriorPipeline.from_pretrained(str(root / "lora"))
    pipe.prior.load_lora_adapter(str(root / "lora"), weight_name=LORA_WEIGHT_NAME, prefix=None)  # the card's call
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(prompts[0]["prompt"], num_inference_steps=25, guidance_scale=4.0,
                  generator=torch.Generator().manual_seed(0)).image_embeds  # [1, E]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ours, base, atol=1e-4)
    with pytest.raises(Refused, match="is a LoRA run's export: its prior/ holds the base weights"):
        train_prior(tmp_path / "again", tiny_cache, "--pretrained_prior_model_name_or_path", str(root / "lora"),
                    "--max_train_steps", "1")


@pytest.mark.slow
def test_prior_merge_lora_exports_base_plus_adapter_merged(prior_runs, train_prior, tiny_cache, tmp_path):
    from diffusers import PriorTransformer

    root, _, _ = prior_runs
    train_prior(tmp_path / "merged", tiny_cache, *PRIOR_RUN, "--merge_lora")
    assert not (tmp_path / "merged" / LORA_WEIGHT_NAME).exists()
    assert "**LoRA, merged.**" in (tmp_path / "merged" / "README.md").read_text()
    merged = PriorTransformer.from_pretrained(tmp_path / "merged", subfolder="prior").eval()
    adapted = PriorTransformer.from_pretrained(root / "lora", subfolder="prior").eval()
    adapted.load_lora_adapter(str(root / "lora"), weight_name=LORA_WEIGHT_NAME, prefix=None)
    e = merged.config.embedding_dim
    generator = torch.Generator().manual_seed(3)
    inputs = (torch.randn(2, e, generator=generator), torch.tensor([5, 700]), torch.randn(2, e, generator=generator),
              torch.randn(2, merged.config.num_embeddings, e, generator=generator), torch.ones(2, 77, dtype=torch.bool))
    with torch.no_grad():
        ours, theirs = merged(*inputs).predicted_image_embedding, adapted(*inputs).predicted_image_embedding
        adapted.disable_adapters()
        base = adapted(*inputs).predicted_image_embedding
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(ours, base, atol=1e-4)


@pytest.mark.slow
def test_prior_lora_ema_resume_is_exact_and_exports_the_ema_adapter(prior_runs, train_prior, tiny_cache, tmp_path):
    root, _, straight_summary = prior_runs
    flags = (*PRIOR_RUN, "--use_ema", "--ema_decay", "0.9")
    straight = train_prior(tmp_path / "a", tiny_cache, *flags)
    checkpoint = tmp_path / "a" / "checkpoint-2"
    assert sorted(os.listdir(checkpoint / "prior_lora_ema")) == ["ema_state.json", LORA_WEIGHT_NAME]
    shutil.copytree(checkpoint, tmp_path / "b" / "checkpoint-2")  # without a's later checkpoints and log
    resumed = train_prior(tmp_path / "b", tiny_cache, *flags, "--resume_from_checkpoint", "latest")
    assert len(straight["losses"]) == PRIOR_STEPS and resumed["losses"] == straight["losses"][2:]
    assert straight["losses"][:2] == straight_summary["losses"][:2]  # the EMA changes no training draw
    exported = {run: str(tmp_path / run / LORA_WEIGHT_NAME) for run in ("a", "b")}
    assert same_tensors(exported["a"], exported["b"])
    last = tmp_path / "a" / "checkpoint-4"
    assert same_tensors(exported["a"], str(last / "prior_lora_ema" / LORA_WEIGHT_NAME))  # the export is the EMA
    assert not same_tensors(exported["a"], str(last / "prior_lora" / LORA_WEIGHT_NAME))


# --- decoder ------------------------------------------------------------------------------------------

def card_loads(card: str) -> str:
    """The model card's usage code up to the generation line: the pipeline and adapter loads, to run as written."""
    usage = card.split("```python\n", 1)[1].split("```", 1)[0]
    return usage.split("image = pipe(", 1)[0]


@pytest.mark.slow
def test_decoder_lora_first_loss_export_and_documented_load(prior_runs, train_prior, tiny_models, tiny_cache, tmp_path,
                                                            one_thread):
    """A LoRA decoder trained beside the LoRA prior: the card's own lines load both adapters, and it generates;
    a prior's card naming the LoRA decoder loads its adapter too, and its validation renders with it."""
    from diffusers import AutoPipelineForText2Image

    from train.render import DecoderParts

    prior_out = prior_runs[0] / "lora"
    common = ("--train_batch_size", "4", "--learning_rate", "1e-2", "--validation_images", "0")
    full, _ = run_decoder(decoder_flags(tiny_models, tiny_cache, tmp_path / "full", *common, "--max_train_steps", "1"))
    assert "load_lora_adapter" not in (tmp_path / "full" / "README.md").read_text()  # nothing to load
    out = tmp_path / "lora"
    lora, _ = run_decoder(decoder_flags((prior_out, tiny_models[1]), tiny_cache, out, *common, *LORA,
                                        "--max_train_steps", "3"))
    assert lora["losses"][0] == full["losses"][0]  # zero-initialised B: exactly the base's forward, same draws
    loads = card_loads((out / "README.md").read_text())
    assert f'pipe.unet.load_lora_adapter("{out}", weight_name="{LORA_WEIGHT_NAME}", prefix=None)' in loads
    assert f'pipe.prior_prior.load_lora_adapter("{prior_out}", weight_name="{LORA_WEIGHT_NAME}", prefix=None)' in loads
    weights = load_file(str(out / LORA_WEIGHT_NAME))
    assert any(".add_k_proj.lora_B." in k for k in weights)  # the image embedding's path is adapted by default
    assert all(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)  # training moved every B

    def image(pipe):
        return pipe(PROMPT, num_inference_steps=2, prior_num_inference_steps=2, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    base = image(AutoPipelineForText2Image.from_pretrained(str(out)))  # the card's prior: entry, both bases
    namespace: dict = {}
    exec(loads, namespace)  # the card's usage as written: the pipeline, then both adapters
    pipe = namespace["pipe"]
    assert pipe.prior_prior.peft_config and pipe.unet.peft_config
    adapted = image(pipe)
    assert adapted.shape == (1, 64, 64, 3) and abs(adapted - base).max() > 1e-3

    parts = DecoderParts.load(str(out), torch.device("cpu"), with_unet=True)  # what a prior's validation renders with
    args = unet_inputs(parts.unet)
    with torch.no_grad():
        ours = parts.unet(*args[:3], added_cond_kwargs=args[3]).sample
        theirs = pipe.unet(*args[:3], added_cond_kwargs=args[3]).sample
    torch.testing.assert_close(ours, theirs)
    assert not parts.unet.training
    train_prior(tmp_path / "prior", tiny_cache, "--pretrained_decoder_model_name_or_path", str(out),
                "--max_train_steps", "1")
    prior_loads = card_loads((tmp_path / "prior" / "README.md").read_text())
    assert prior_loads.endswith(f'pipe.unet.load_lora_adapter("{out}", weight_name="{LORA_WEIGHT_NAME}", prefix=None)\n')
