"""Peak memory of one trainer in a process of its own, against the trainee-only footprint.

Each side runs in a fresh child process (`bench.py _memory SPEC`), so that neither sees the other's
models or allocator state. CPU: the peak of RssAnon (polled every millisecond; anonymous memory is
what tensors live in, file-backed pages are the shared libraries) minus RssAnon after the imports.
GPU: `torch.cuda.max_memory_allocated()`. Trainee-only = parameters + gradients + the two AdamW
states (4 x fp32 parameter bytes) + the trainee's activations, measured as the bytes of every
distinct storage autograd saves for backward during a step (parameters excluded, autocast's weight
copies included), the largest over the steps run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

POLL_SECONDS = 0.001
RESULT_PREFIX = "BENCH_JSON "
MIB = 2**20


def rss_anon_bytes() -> int:
    """Current anonymous resident memory of this process (Linux /proc)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


class AnonPeak:
    """Background thread keeping the largest RssAnon seen (torch kernels release the GIL)."""

    def __init__(self) -> None:
        self.peak = rss_anon_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon_bytes())
            time.sleep(POLL_SECONDS)

    def __enter__(self) -> AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon_bytes())


class SavedTensorMeter:
    """Bytes of the distinct storages autograd saves for backward during one step (the activations)."""

    def __init__(self, parameters) -> None:
        self.exclude = {p.untyped_storage().data_ptr() for p in parameters}
        self.seen: dict[int, int] = {}
        self.per_step: list[int] = []

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in self.exclude and pointer not in self.seen:
            self.seen[pointer] = storage.nbytes()
        return tensor

    def run(self, step) -> None:
        self.seen = {}
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor):
            step()
        self.per_step.append(sum(self.seen.values()))


def import_everything(device: torch.device) -> None:
    """Load every library either side uses, and initialise the CPU kernels, before the baseline.

    diffusers and transformers import model code lazily: without this, module import memory would be
    charged to whichever trainer touches a class first.
    """
    import datasets  # noqa: F401
    import diffusers
    import transformers
    import webdataset  # noqa: F401

    import train.decoder  # noqa: F401
    import train.loop  # noqa: F401
    import train.prior  # noqa: F401

    for name in ("PriorTransformer", "UNet2DConditionModel", "VQModel", "DDPMScheduler"):
        getattr(diffusers, name)
    for name in ("CLIPTextModelWithProjection", "CLIPVisionModelWithProjection", "CLIPTokenizer",
                 "CLIPImageProcessor"):
        getattr(transformers, name)
    x = torch.randn(2, 3, 8, 8, device=device, requires_grad=True)  # first matmul / conv / sdpa / backward
    y = torch.nn.functional.conv2d(x, torch.randn(3, 3, 3, 3, device=device), padding=1).flatten(2)  # [2, 3, 64]
    (torch.nn.functional.scaled_dot_product_attention(y, y, y) @ y.transpose(1, 2)).sum().backward()


def child_main(spec: dict) -> dict:
    """Build one side, run `steps` steps, and measure; the parent reads the returned dict."""
    from accelerate import Accelerator
    from bench_reference import ReferenceDecoder, ReferencePrior
    from bench_steps import LeanTrainer

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    import_everything(device)
    baseline = rss_anon_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with AnonPeak() as anon:
        accelerator = Accelerator(mixed_precision=spec["mixed_precision"], cpu=device.type == "cpu")
        paths = {k: Path(v) for k, v in spec["paths"].items()}
        if spec["side"] == "lean":
            trainer = LeanTrainer(spec["kind"], spec["argv"], accelerator, tune_heap=True)  # as train/loop.py
            step = trainer.stream_step
        elif spec["kind"] == "prior":
            trainer = ReferencePrior(paths["prior"], paths["data"], accelerator, spec["batch_size"],
                                     spec["num_workers"], paths["hf_cache"])
            step = trainer.step
        else:
            trainer = ReferenceDecoder(paths["prior"], paths["decoder"], paths["data"], accelerator,
                                       spec["batch_size"], spec["num_workers"], spec["resolution"], paths["hf_cache"])
            step = trainer.step
        trainable = [p for p in trainer.trainee.parameters() if p.requires_grad]
        meter = SavedTensorMeter(trainer.trainee.parameters())
        for _ in range(spec["steps"]):
            meter.run(step)
    param_bytes = sum(p.numel() * p.element_size() for p in trainable)
    activations = max(meter.per_step)
    result = {
        "kind": spec["kind"], "side": spec["side"], "device": device.type,
        "baseline_anon_bytes": baseline, "peak_anon_bytes": anon.peak, "job_anon_bytes": anon.peak - baseline,
        "trainee_parameters": sum(p.numel() for p in trainable), "param_bytes": param_bytes,
        "param_grad_adam_bytes": 4 * param_bytes, "activation_bytes": activations,
        "activation_bytes_per_step": meter.per_step, "trainee_only_bytes": 4 * param_bytes + activations,
    }
    if device.type == "cuda":
        result["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    result["peak_bytes"] = result["cuda_peak_allocated_bytes"] if device.type == "cuda" else result["job_anon_bytes"]
    result["peak_over_trainee_only"] = result["peak_bytes"] / result["trainee_only_bytes"]
    return result


def child_spec(bench, kind: str, side: str, argv: list[str] | None) -> dict:
    """What `child_main` measures: `kind`'s `side` ("lean" with its trainer flags `argv`, or "reference") with the
    preset, device and paths of `bench` (a scripts/bench.py `Bench`)."""
    return {"kind": kind, "side": side, "argv": argv, "device": bench.device.type,
            "mixed_precision": bench.args.mixed_precision, "threads": bench.args.threads,
            "steps": bench.p.memory_steps, "num_workers": bench.p.num_workers, "resolution": bench.p.resolution,
            "batch_size": bench.p.prior_batch_size if kind == "prior" else bench.p.decoder_batch_size,
            "paths": {"prior": str(bench.prior_dir), "decoder": str(bench.decoder_dir), "data": str(bench.data),
                      "hf_cache": str(bench.hf_cache)}}


def run_child(spec: dict, bench_script: Path, timeout: float = 900) -> dict:
    """Run `bench.py _memory SPEC` in a new process; returns its measurement dict."""
    proc = subprocess.run([sys.executable, str(bench_script), "_memory", json.dumps(spec)], capture_output=True,
                          text=True, timeout=timeout, check=False)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    raise RuntimeError(f"memory child {spec['kind']}/{spec['side']} failed (exit {proc.returncode}):\n"
                       f"{proc.stderr[-3000:]}")


def mib(value: float) -> float:
    return value / MIB
