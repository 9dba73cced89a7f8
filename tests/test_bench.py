"""scripts/bench.py in smoke mode: the figures are not asserted (no timed tests), their structure is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "scripts" / "bench.py"
# Smallest run that still exercises every section: 2 repeats give a min, a max and a per-pair ratio.
SMOKE = ["--threads", "1", "--repeats", "2", "--steps", "1", "--warmup", "1", "--memory_steps", "1",
         "--precompute_repeats", "2", "--num_images", "16", "--samples_per_shard", "8"]
# Published parameter counts (shared/reference/kandinsky-2-2/README.md).
PUBLISHED = {"text_encoder": 694_659_840, "image_encoder": 1_844_907_264, "prior": 1_026_225_920,
             "unet": 1_253_057_288, "movq": 67_832_495}


def run_bench(out: Path, *extra: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(BENCH), "--out_dir", str(out), *extra], capture_output=True, text=True,
                          env=env, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


def check_series(summary: dict, repeats: int) -> None:
    assert len(summary["values"]) == repeats
    assert summary["min"] <= summary["median"] <= summary["max"]
    assert summary["min"] > 0


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("bench_tiny")
    doc = out / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nprose that must survive\n")
    return run_bench(out, "--size", "tiny", *SMOKE, "--update_docs", str(doc)), out


@pytest.mark.slow
def test_every_section_reports_its_comparisons(tiny_results):
    results, _ = tiny_results
    sections = results["sections"]
    assert set(sections) == {"precompute", "cache", "prior", "decoder", "stream", "memory", "lora"}
    expected = {
        "precompute": (("end_to_end", "bare", "loop"), ("end_to_end/bare", "loop/bare")),
        "prior": (("lean_trimmed", "lean_77", "reference"),
                  ("lean_trimmed/reference", "lean_77/reference", "lean_trimmed/lean_77")),
        "decoder": (("lean", "reference"), ("lean/reference",)),
    }
    for name, (sides, ratios) in expected.items():
        assert set(sections[name]["sides"]) == set(sides), name
        assert set(sections[name]["ratios"]) == set(ratios), name
        for summary in [*sections[name]["sides"].values(), *sections[name]["ratios"].values()]:
            check_series(summary, 2)
    for kind in ("prior", "decoder"):
        stream = sections["stream"][kind]
        assert set(stream["sides"]) == {"shards", "memory"} and set(stream["ratios"]) == {"shards/memory"}
        check_series(stream["ratios"]["shards/memory"], 2)
        assert 0 < stream["verify_fraction"] < stream["data_wait_fraction"] < 1  # verifying is part of the data wait
    for side in ("lean_trimmed", "lean_77", "reference"):
        assert sections["prior"]["sides"][side]["flops_per_sample"] > 0
    tokens = sections["prior"]["mean_text_tokens"]
    assert tokens["lean_77"] == 77 and tokens["lean_trimmed"] < 77
    # issue 12: the guide's batch 1 x accumulation 4 and batch 4 beside the preset's, each lean vs reference,
    # and the lean step's breakdown with 0 and 1 DataLoader workers
    for kind, lean in (("prior", "lean_trimmed"), ("decoder", "lean")):
        assert set(sections[kind]["settings"]) == {"1x4", "4"} - {str(sections[kind]["batch_size"])}
        for label, node in [("preset", sections[kind]), *sections[kind]["settings"].items()]:
            assert set(node["sides"]) >= {lean, "reference"}, (kind, label)
            check_series(node["ratios"][f"{lean}/reference"], 2)
            assert set(node["breakdown"]) == {"0", "1"}
            for summary in node["breakdown"].values():
                assert set(summary["share"]) == {"data", "forward", "backward", "optimizer", "other"}
                assert sum(summary["share"].values()) == pytest.approx(1.0)
                assert summary["share"]["forward"] > 0 and summary["share"]["backward"] > 0
        assert sections[kind]["settings"]["1x4"]["accumulation"] == 4


@pytest.mark.slow
def test_memory_and_cache_figures(tiny_results):
    results, _ = tiny_results
    memory = results["sections"]["memory"]
    assert set(memory) == {"prior_lean", "prior_reference", "decoder_lean", "decoder_reference"}
    for m in memory.values():
        assert m["trainee_only_bytes"] == m["param_grad_adam_bytes"] + m["activation_bytes"]
        assert m["param_grad_adam_bytes"] == 4 * m["param_bytes"] and m["activation_bytes"] > 0
        assert m["peak_bytes"] > 0 and m["peak_over_trainee_only"] == m["peak_bytes"] / m["trainee_only_bytes"]
    # Same trainee; the reference also trains the prior's clip_mean/clip_std (2 x E), the lean trainer freezes them.
    lean, reference = memory["prior_lean"]["trainee_parameters"], memory["prior_reference"]["trainee_parameters"]
    assert 0 <= reference - lean <= 0.01 * lean
    cache = results["sections"]["cache"]
    assert 0 < cache["prior_over_padded"] < 1  # trimmed fp16 text states are smaller than 77 padded rows
    assert cache["captions_per_sample"] == 3  # make_sample_data writes three captions per image
    lengths = results["caption_lengths"]
    assert lengths["count"] == 3 * cache["samples"] and 2 <= lengths["min"] <= lengths["median"] <= lengths["max"] <= 77


@pytest.mark.slow
def test_lora_section_compares_the_adapter_with_the_full_fine_tune(tiny_results):
    results, _ = tiny_results
    lora, memory = results["sections"]["lora"], results["sections"]["memory"]
    assert lora["rank"] == 4
    for kind in ("prior", "decoder"):
        m = lora[kind]
        assert set(m["sides"]) == {"full", "lora"} and set(m["ratios"]) == {"lora/full"}
        check_series(m["ratios"]["lora/full"], 2)
        params = m["trainable_parameters"]
        assert params["full"] == memory[f"{kind}_lean"]["trainee_parameters"]  # the same trainee, all of it
        assert 0 < params["lora"] < 0.2 * params["full"]  # the adapter only
        assert m["peak_bytes"]["full"] == memory[f"{kind}_lean"]["peak_bytes"]  # reused from the memory section
        assert m["peak_bytes"]["lora"] > 0


@pytest.mark.slow
def test_tables_and_docs_block(tiny_results):
    _, out = tiny_results
    table = (out / "results.md").read_text()
    for row in ("prior: lean (trimmed) vs reference", "decoder: lean vs reference", "stream (decoder)",
                "precompute: end to end vs bare encoders", "**Memory**", "**Cache size**", "Captions (typical)",
                "Record verification", "**LoRA vs full fine-tune**", "**Training steps by batch setting**",
                "**Lean step breakdown"):
        assert row in table
    doc = (out / "benchmarks.md").read_text()
    assert "prose that must survive" in doc and "<!-- bench:tiny:begin -->" in doc and table.strip() in doc


@pytest.mark.slow
def test_toy_full_path_runs_in_bf16(tmp_path):
    """--size full's code path (models from the reference configs, bf16 autocast, workers) at toy widths."""
    results = run_bench(tmp_path, "--size", "full", "--toy_full", "--device", "cpu", "--mixed_precision", "bf16",
                        "--sections", "prior,decoder", "--resolution", "64", "--image_size", "64",
                        "--prior_batch_size", "4", "--decoder_batch_size", "2", "--precompute_batch_size", "8",
                        "--num_workers", "1", "--precompute_workers", "0", *SMOKE)
    assert results["mixed_precision"] == "bf16" and results["parameters"]["prior"] > 0
    for name in ("prior", "decoder"):
        assert "error" not in results["sections"][name], results["sections"][name].get("error")


def test_reference_configs_build_the_published_architectures():
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_full_models import count_parameters_on_meta

    assert count_parameters_on_meta() == PUBLISHED


def test_update_docs_replaces_only_its_own_block(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_report import update_docs

    doc = tmp_path / "b.md"
    doc.write_text("# B\n\nintro\n")
    update_docs(doc, "small", "old small\n")
    update_docs(doc, "full", "full figures\n")
    update_docs(doc, "small", "new small\n")
    text = doc.read_text()
    assert "intro" in text and "full figures" in text and "new small" in text and "old small" not in text
    assert text.count("<!-- bench:small:begin -->") == 1


def test_typical_captions_have_the_stated_lengths():
    sys.path.insert(0, str(ROOT / "scripts"))
    from _tokenizer_vocab import build_clip_tokenizer
    from bench_setup import typical_captions

    tokenizer = build_clip_tokenizer()
    base = ["a red circle on a blue background", "red circle, blue"] * 200
    longer = typical_captions(base, tokenizer, np.random.default_rng(0))
    lengths = np.array([len(tokenizer(c).input_ids) for c in longer])
    assert all(c.startswith(b) for c, b in zip(longer, base))  # lengthened, never rewritten
    assert 14 <= np.median(lengths) <= 18 and lengths.max() <= 77
    assert 0.7 <= np.mean((lengths >= 10) & (lengths <= 25)) <= 0.95


def test_saved_tensor_meter_counts_activations_not_parameters():
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_memory import SavedTensorMeter

    layer = torch.nn.Linear(16, 32, bias=False)
    x = torch.randn(8, 16)  # [B, in]
    meter = SavedTensorMeter(layer.parameters())
    meter.run(lambda: torch.relu(layer(x)).sum().backward())
    # mm saves its input x (for the weight's gradient) and relu its output [8, 32]; the weight is excluded.
    assert meter.per_step == [x.numel() * 4 + 8 * 32 * 4]


def test_batch_settings_and_reference_scripts_are_parsed(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_args import Setting, parse_setting, reference_kind

    assert parse_setting("1x4") == Setting(1, 4) and parse_setting("4") == Setting(4, 1)
    assert parse_setting("1x4").label == "1x4" and parse_setting("1x4").samples == 4
    with pytest.raises(ValueError):
        parse_setting("0x4")
    script = tmp_path / "train_text_to_image_decoder.py"
    script.write_text("")
    assert reference_kind(script) == "decoder"
    with pytest.raises(ValueError, match="no such file"):
        reference_kind(tmp_path / "train_text_to_image_prior.py")
    with pytest.raises(ValueError, match="must say prior or decoder"):
        reference_kind(tmp_path / "train.py")
