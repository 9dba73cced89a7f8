"""Benchmarks: does the embedding cache pay? One run, one machine, same models and batch sizes.

Sections (all by default; `--sections` picks some), each timing its contenders in turn, A B A B ...:

  precompute  `python -m precompute` end to end vs the bare forward passes of the same encoders on
              the same preprocessed batches held in memory (images/s). Its last cache feeds the rest.
  cache       bytes/sample of the prior and decoder records vs the padded 77-token fp16 layout.
  prior       lean prior step from shards (the loop's own step: train/step.py), trimmed to the longest
              caption, vs the exact 77-token forward vs a re-implementation of the diffusers
              reference step (CLIP text + CLIP vision on raw captions/images every step, its
              preprocessing in a DataLoader, its own torch AdamW); at the preset batch and at each
              --batch_settings (default: the guide's batch 1 x accumulation 4, and batch 4), with the
              lean step broken into data / forward / backward / optimizer / other.
  decoder     lean decoder step (cached latents + image_embeds) vs the reference step (MoVQ encode +
              CLIP vision every step, image preprocessing included), at the same settings.
  stream      each lean trainer streaming shards from disk vs the same step replaying the very same
              batches from memory (does the data path hold the device back?), and the share of the
              streaming step its readers spent verifying records (timed inside the readers).
  memory      peak memory of each lean trainer and reference step, one fresh process each, against
              the trainee-only footprint (params + grads + AdamW states + activations).
  lora        each lean trainer with a LoRA adapter (`--rank 4`) vs the full fine-tune: trainable
              parameters, speed and peak memory (scripts/bench_lora.py).
  update      (only when named in --sections) `precompute --update` after 1% new images on a cache of
              2,000 tiny-model images vs the fresh run (scripts/bench_update.py, which also runs alone).
  blackbox    (only with --reference_script PATH) `python -m train` itself vs the diffusers script
              itself, whole processes, per-step time from two run lengths (scripts/bench_blackbox.py).

Sizes: tiny (smoke test), small (CPU: ~3 M prior, ~25 M UNet), full (the published architectures
with random weights, for a GPU in bf16; see scripts/gpu_bench.sh). Writes OUT/results.json (every
raw figure), OUT/results.md (the tables) and, with --update_docs, the block of this size in
docs/benchmarks.md.

    python scripts/bench.py --size small --update_docs
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
SCRIPTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [SCRIPTS, os.path.dirname(SCRIPTS)]  # sibling modules, and the repo's packages without install

import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import bench_setup as setup  # noqa: E402
import torch  # noqa: E402
from bench_args import OPTIONAL_SECTIONS, SECTIONS, parse_args  # noqa: E402
from bench_sections import TrainerSections  # noqa: E402
from bench_timing import peak_flops  # noqa: E402

PRIOR_MEMBERS = ("captions.json", "text_embeds.npy", "text_hidden.npy", "text_lengths.npy", "image_embeds.npy")
DECODER_MEMBERS = ("image_embeds.npy", "latents.npy")


class Bench(TrainerSections):
    """Holds the run's inputs and results; one method per section."""

    def __init__(self, args):
        from accelerate import Accelerator
        from make_tiny_models import parameter_counts

        self.started = time.perf_counter()  # elapsed time includes building models, data and caches
        self.args, self.p, self.device = args, args.preset, args.device
        self.work = args.out_dir.resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        configs = None
        if args.size == "full":
            from bench_full_models import load_configs, shrink_configs

            configs = shrink_configs(load_configs()) if args.toy_full else load_configs()
        self.prior_dir, self.decoder_dir = setup.ensure_models(args.size, self.work, self.device, configs=configs)
        self.data = setup.ensure_data(self.work, self.p, args.captions, self.prior_dir / "tokenizer")
        self.hf_cache = self.work / "hf_cache"
        self.cache: Path | None = None
        self.accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=self.device.type == "cpu")
        self.results = {
            "size": args.size, "device": self.device.type, "mixed_precision": args.mixed_precision,
            "captions": args.captions, "command": "python scripts/bench.py " + " ".join(sys.argv[1:]),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "provisional": args.provisional, "preset": setup.preset_dict(self.p),
            "torch_compile": args.torch_compile, "breakdown_workers": args.breakdown_workers,
            "parameters": parameter_counts(self.prior_dir, self.decoder_dir), "sections": {},
        }
        from bench_report import machine_info

        self.results["machine"] = machine_info(self.device)

    def log(self, message: str) -> None:
        print(f"[bench {time.perf_counter() - self.started:6.1f}s] {message}", flush=True)

    def precompute_argv(self, out: Path, max_samples: int | None) -> list[str]:
        return setup.precompute_argv(self.prior_dir, self.decoder_dir, self.data, out, self.p, self.device,
                                     self.args.mixed_precision, max_samples)

    def ensure_cache(self) -> Path:
        if self.cache is None:
            self.cache = self.work / "cache"
            import shutil

            shutil.rmtree(self.cache, ignore_errors=True)
            setup.run_precompute(self.precompute_argv(self.cache, None), self.work / "cache.log")
        return self.cache

    def section_precompute(self) -> dict:
        from bench_precompute import bench_precompute

        result, self.cache = bench_precompute(self.precompute_argv, self.work / "precompute", device=self.device,
                                              mixed_precision=self.args.mixed_precision,
                                              repeats=self.p.precompute_repeats, log=self.log)
        return result

    def section_cache(self) -> dict:
        import numpy as np
        from inspect_cache import padded_prior_bytes

        from precompute.format import FLOAT_DTYPES

        sizes = setup.read_member_sizes(self.ensure_cache())
        totals, n = sizes["manifest"]["totals"], sizes["manifest"]["totals"]["train"]["samples"]
        self.results["caption_lengths"] = setup.length_stats(sizes["text_lengths"])
        prior = sum(sizes["payload"].get(m, 0) for m in PRIOR_MEMBERS)
        padded = padded_prior_bytes(len(sizes["text_lengths"]), n, sizes["manifest"]["shapes"],
                                    np.dtype(FLOAT_DTYPES[sizes["manifest"]["dtype"]]).itemsize)
        return {
            "samples": n, "prior_bytes_per_sample": prior / n, "padded_prior_bytes_per_sample": padded / n,
            "prior_over_padded": prior / padded,
            "prior_tar_bytes_per_sample": sum(sizes["stored"].get(m, 0) for m in PRIOR_MEMBERS) / n,
            "decoder_bytes_per_sample": sum(sizes["payload"].get(m, 0) for m in DECODER_MEMBERS) / n,
            "decoder_tar_bytes_per_sample": sum(sizes["stored"].get(m, 0) for m in DECODER_MEMBERS) / n,
            "tar_bytes_per_sample": totals["train"]["bytes"] / n,
            "payload_bytes_per_member": {m: b / n for m, b in sizes["payload"].items()},
            "captions_per_sample": len(sizes["text_lengths"]) / n,
        }

    def section_memory(self) -> dict:
        from bench_memory import child_spec, run_child

        out = {}
        for kind in ("prior", "decoder"):
            for side in ("lean", "reference"):
                self.log(f"memory: {kind} {side} in a child process")
                argv = self.lean_argv(kind) if side == "lean" else None
                out[f"{kind}_{side}"] = run_child(child_spec(self, kind, side, argv), Path(__file__))
        return out

    def section_lora(self) -> dict:
        from bench_lora import bench_lora

        return bench_lora(self, Path(__file__))

    def section_update(self) -> dict:
        from bench_update import bench_update

        return bench_update(self.prior_dir, self.decoder_dir, self.work / "update", log=self.log)

    def save(self) -> None:
        from bench_report import render

        self.results["elapsed_s"] = time.perf_counter() - self.started
        self.results["machine"]["loadavg_end"] = os.getloadavg()
        (self.work / "results.json").write_text(json.dumps(self.results, indent=1, default=str))
        (self.work / "results.md").write_text(render(self.results))

    def run(self) -> dict:
        peak_dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.results["peak_flops"] = peak_flops(self.device, peak_dtype)
        order = [s for s in SECTIONS + OPTIONAL_SECTIONS if s in self.args.sections]
        for name in order:
            self.log(f"section {name}")
            try:
                self.results["sections"][name] = getattr(self, f"section_{name}")()
            except Exception:  # noqa: BLE001 - one failed section (e.g. out of memory) must not lose the others
                self.results["sections"][name] = {"error": traceback.format_exc()}
                self.log(f"section {name} failed:\n{traceback.format_exc()}")
            self.accelerator.free_memory()  # drops its references to this section's models and optimizers
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.save()
        return self.results


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_memory"]:  # internal: one memory measurement in this fresh process
        from bench_memory import RESULT_PREFIX, child_main

        print(RESULT_PREFIX + json.dumps(child_main(json.loads(argv[1]))), flush=True)
        return 0
    args = parse_args(argv, __doc__)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bench = Bench(args)
    results = bench.run()
    from bench_report import render, update_docs

    block = render(results)
    print(block)
    if args.update_docs:
        update_docs(args.update_docs, args.size, block)
    failed = [k for k, v in results["sections"].items() if "error" in v]
    print(f"results: {bench.work / 'results.json'} and results.md" + (f"; failed sections: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
