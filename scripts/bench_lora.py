"""The `lora` section of scripts/bench.py: LoRA (`--rank`) against a full fine-tune, for both trainers.

Per trainer, the same lean step (the loop's loader and `train_step`, as the other sections) with and
without `--rank`: trainable parameters, speed (the two sides timed in turn, A B A B ...) and peak
memory (each side in a fresh process, measured as the memory section measures; the full side's
figure is taken from the memory section when it ran in the same benchmark, else measured here).
Each side has its own trainee: an adapter changes the model in place.

    python scripts/bench.py --size small --sections lora
"""

from __future__ import annotations

import gc
from pathlib import Path

from bench_memory import child_spec, run_child
from bench_timing import Side

RANK = 4  # the default --rank of diffusers' Kandinsky 2.2 LoRA scripts
LORA_ARGS = ("--rank", str(RANK))


def trainable(model) -> int:
    """Parameters that receive gradients."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def bench_lora(bench, bench_script: Path) -> dict:
    """Run the section on `bench` (a scripts/bench.py `Bench`, whose script runs the memory children); returns
    {"rank": RANK, command: figures}."""
    out: dict = {"rank": RANK}
    memory = bench.results["sections"].get("memory") or {}
    for command in ("prior", "decoder"):
        full, lora = bench.lean(command), bench.lean(command, extra=LORA_ARGS)
        result = bench.timing([Side("full", full.stream_step, "full fine-tune"),
                               Side("lora", lora.stream_step, f"LoRA rank {RANK}")], [("lora", "full")])
        result["trainable_parameters"] = {"full": trainable(full.trainee), "lora": trainable(lora.trainee)}
        del full, lora
        bench.accelerator.free_memory()
        gc.collect()
        peaks = {"full": memory.get(f"{command}_lean") if isinstance(memory.get(f"{command}_lean"), dict) else None}
        for side, extra in (("full", ()), ("lora", LORA_ARGS)):
            if peaks.get(side) is None or "peak_bytes" not in peaks[side]:
                bench.log(f"lora: {command} {side} memory in a child process")
                argv = bench.lean_argv(command, extra=extra)
                peaks[side] = run_child(child_spec(bench, command, "lean", argv), bench_script)
        result["peak_bytes"] = {side: peaks[side]["peak_bytes"] for side in ("full", "lora")}
        out[command] = result
    return out


def lora_table(results: dict) -> list[str]:
    """The Markdown rows of the section (empty when it did not run or failed)."""
    from bench_memory import mib
    from bench_report import _lookup, _span

    node = _lookup(results["sections"], "lora")
    if not node:
        return []
    unit = "torch.cuda.max_memory_allocated" if results["device"] == "cuda" else "peak RssAnon"
    lines = [f"| trainer | trainable parameters (LoRA / full) | counted GFLOP/sample LoRA / full | samples/s LoRA | "
             f"samples/s full | LoRA / full speed | peak MiB LoRA / full ({unit}) |", "|---|---|---|---|---|---|---|"]
    for command in ("prior", "decoder"):
        m = node.get(command)
        if not m:
            continue
        params, peak, sides = m["trainable_parameters"], m["peak_bytes"], m["sides"]
        flops = [sides[side].get("flops_per_sample") or 0.0 for side in ("lora", "full")]
        lines.append(f"| {command} | {params['lora']:,} / {params['full']:,} ({100 * params['lora'] / params['full']:.2f}%) "
                     f"| {flops[0] / 1e9:.3g} / {flops[1] / 1e9:.3g} | {_span(sides['lora'])} | {_span(sides['full'])} "
                     f"| {_span(m['ratios']['lora/full'], '×')} | {mib(peak['lora']):,.0f} / {mib(peak['full']):,.0f} "
                     f"({peak['lora'] / peak['full']:.2f}×) |")
    return [*lines, f"\nLoRA: `--rank {node['rank']}` on the default targets (train/lora.py); the same lean step."]
