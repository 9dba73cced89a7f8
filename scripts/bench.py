"""Benchmarks: does the embedding cache pay? One run, one machine, same models and batch sizes.

Sections (all by default; `--sections` picks some), each timing its contenders in turn, A B A B ...:

  precompute  `python -m precompute` end to end vs the bare forward passes of the same encoders on
              the same preprocessed batches held in memory (images/s). Its last cache feeds the rest.
  cache       bytes/sample of the prior and decoder records vs the padded 77-token fp16 layout.
  prior       lean prior step from shards, trimmed to the longest caption vs the exact 77-token
              forward vs a re-implementation of the diffusers reference step (CLIP text + CLIP
              vision on raw captions/images every step, its preprocessing in a DataLoader).
  decoder     lean decoder step (cached latents + image_embeds) vs the reference step (MoVQ encode +
              CLIP vision every step, image preprocessing included).
  stream      each lean trainer streaming shards from disk vs the same step replaying the very same
              batches from memory (does the data path hold the device back?), and the share of the
              streaming step its readers spent verifying records (timed inside the readers).
  memory      peak memory of each lean trainer and reference step, one fresh process each, against
              the trainee-only footprint (params + grads + AdamW states + activations).
  lora        each lean trainer with a LoRA adapter (`--rank 4`) vs the full fine-tune: trainable
              parameters, speed and peak memory (scripts/bench_lora.py).
  update      (only when named in --sections) `precompute --update` after 1% new images on a cache of
              2,000 tiny-model images vs the fresh run (scripts/bench_update.py, which also runs alone).

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

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections import deque  # noqa: E402
from pathlib import Path  # noqa: E402

import bench_setup as setup  # noqa: E402
import torch  # noqa: E402
from bench_timing import Side, alternate, peak_flops  # noqa: E402

SECTIONS = ("precompute", "cache", "prior", "decoder", "stream", "memory", "lora")
OPTIONAL_SECTIONS = ("update",)  # run only when --sections names them
PRIOR_MEMBERS = ("captions.json", "text_embeds.npy", "text_hidden.npy", "text_lengths.npy", "image_embeds.npy")
DECODER_MEMBERS = ("image_embeds.npy", "latents.npy")
DEFAULT_DOC = Path(SCRIPTS).parent / "docs" / "benchmarks.md"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(setup.PRESETS), default="small",
                        help="model size: tiny (seconds, for the smoke test), small (CPU), full (GPU, bf16)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS + OPTIONAL_SECTIONS)} (default: all "
                        f"but {','.join(OPTIONAL_SECTIONS)})")
    parser.add_argument("--out_dir", type=Path, help="work and output folder (default: bench_out/<size>)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"),
                        help="trainee autocast and frozen-encoder dtype, both sides (default: bf16 on cuda, else no)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--captions", choices=("typical", "sample"), default="typical",
                        help="typical: sample-data captions lengthened to a log-normal token count (median 16, "
                        "80%% in 10-25); sample: make_sample_data's own captions (6-12 tokens)")
    for field in dataclasses.fields(setup.Preset):
        defaults = ", ".join(f"{size} {getattr(preset, field.name)}" for size, preset in setup.PRESETS.items())
        parser.add_argument(f"--{field.name}", type=int, help=f"{field.metadata['help']} ({defaults})")
    parser.add_argument("--update_docs", nargs="?", const=str(DEFAULT_DOC), type=Path,
                        help="replace this size's block in docs/benchmarks.md (or the given file)")
    parser.add_argument("--provisional", action="store_true", help="mark the figures provisional (noisy machine)")
    parser.add_argument("--toy_full", action="store_true",
                        help="tests only: --size full code path with toy widths (runs on CPU)")
    args = parser.parse_args(argv)
    args.sections = [s for s in args.sections.split(",") if s]
    unknown = set(args.sections) - set(SECTIONS) - set(OPTIONAL_SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}")
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.mixed_precision = args.mixed_precision or ("bf16" if args.device.type == "cuda" else "no")
    if args.size == "full" and args.device.type != "cuda" and not args.toy_full:
        parser.error("--size full builds 5 B parameters: it needs a GPU (see scripts/gpu_bench.sh)")
    preset = setup.PRESETS[args.size]
    args.preset = dataclasses.replace(preset, **{f.name: getattr(args, f.name) for f in dataclasses.fields(preset)
                                                 if getattr(args, f.name) is not None})
    args.out_dir = args.out_dir or Path("bench_out") / args.size
    return args


class Bench:
    """Holds the run's inputs and results; one method per section."""

    def __init__(self, args: argparse.Namespace):
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
            "provisional": args.provisional, "preset": dataclasses.asdict(self.p),
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

    def lean_argv(self, command: str, trim_padding: bool = True, extra: tuple[str, ...] = ()) -> list[str]:
        """`python -m train <command>` flags of a lean side on the benchmark cache, plus `extra` flags."""
        from bench_steps import lean_argv

        batch = self.p.prior_batch_size if command == "prior" else self.p.decoder_batch_size
        return [*lean_argv(command, self.ensure_cache(), self.prior_dir, self.decoder_dir, batch, self.p.num_workers,
                           self.work / "train_out", self.p.resolution, trim_padding), *extra]

    def lean(self, command: str, trim_padding: bool = True, share=None, extra: tuple[str, ...] = ()):
        from bench_steps import LeanTrainer

        return LeanTrainer(command, self.lean_argv(command, trim_padding, extra), self.accelerator, share)

    def timing(self, sides: list[Side], ratios: list[tuple[str, str]], count: bool = True) -> dict:
        return alternate(sides, repeats=self.p.repeats, steps=self.p.steps, warmup=self.p.warmup, device=self.device,
                         ratios=ratios, log=self.log, count=count)

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

    def section_prior(self) -> dict:
        from bench_steps import ReferencePrior

        trimmed = self.lean("prior", trim_padding=True)
        full = self.lean("prior", trim_padding=False, share=trimmed)  # one trainee + AdamW for all three
        reference = ReferencePrior(self.prior_dir, self.data, self.accelerator, self.p.prior_batch_size,
                                   self.p.num_workers, self.hf_cache, share=trimmed)
        sides = [Side("lean_trimmed", trimmed.stream_step, "lean, trimmed"),
                 Side("lean_77", full.stream_step, "lean, 77 tokens"),
                 Side("reference", reference.step, "reference")]
        result = self.timing(sides, [("lean_trimmed", "reference"), ("lean_77", "reference"),
                                     ("lean_trimmed", "lean_77")])
        result["mean_text_tokens"] = {"lean_trimmed": statistics.mean(trimmed.text_tokens),
                                      "lean_77": statistics.mean(full.text_tokens), "reference": 77}
        result["batch_size"] = self.p.prior_batch_size
        return result

    def section_decoder(self) -> dict:
        from bench_steps import ReferenceDecoder

        lean = self.lean("decoder")
        reference = ReferenceDecoder(self.prior_dir, self.decoder_dir, self.data, self.accelerator,
                                     self.p.decoder_batch_size, self.p.num_workers, self.p.resolution, self.hf_cache,
                                     share=lean)
        result = self.timing([Side("lean", lean.stream_step, "lean"), Side("reference", reference.step, "reference")],
                             [("lean", "reference")])
        result.update(batch_size=self.p.decoder_batch_size, resolution=self.p.resolution)
        return result

    def section_stream(self) -> dict:
        out = {}
        for command in ("prior", "decoder"):
            trainer = self.lean(command)
            recorded: deque = deque()
            # the data wait, measured directly inside the streaming steps; the record verification (sha256,
            # dtype/shape/finiteness checks), timed by the readers themselves (train/loader.py)
            clock = {"data": 0.0, "total": 0.0, "verify": 0.0, "samples": 0}

            def shards(trainer=trainer, recorded=recorded, clock=clock) -> int:
                start, verified = time.perf_counter(), trainer.loader.verify_seconds
                batch = trainer.next_batch()
                clock["data"] += time.perf_counter() - start
                clock["verify"] += trainer.loader.verify_seconds - verified
                recorded.append(batch)
                samples = trainer.step(batch)
                clock["total"] += time.perf_counter() - start
                clock["samples"] += samples
                return samples

            def memory(trainer=trainer, recorded=recorded) -> int:
                return trainer.step(recorded.popleft())  # the batch the shards side read: same work, no I/O

            out[command] = self.timing([Side("shards", shards, "streaming shards"),
                                        Side("memory", memory, "same batches from memory")],
                                       [("shards", "memory")], count=False)
            out[command]["data_wait_fraction"] = clock["data"] / clock["total"]
            out[command]["verify_fraction"] = clock["verify"] / clock["total"]
            out[command]["verify_us_per_sample"] = 1e6 * clock["verify"] / clock["samples"]
            del trainer
            self.accelerator.free_memory()  # the next trainer need not share the device with this one
            gc.collect()
        return out

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
    args = parse_args(argv)
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
