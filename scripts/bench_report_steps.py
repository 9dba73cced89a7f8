"""The training-step tables of the benchmark: lean vs reference per batch setting, the lean step's
breakdown, torch.compile's warm-up, and the black-box comparison (issue 12's goals, reported, never asserted)."""

from __future__ import annotations

from collections.abc import Iterator

PARTS = ("data", "forward", "backward", "optimizer", "other")
# (trainer, setting label) -> lean / reference target on CPU `small` (issue 12); the decoder's at 128 px only.
CPU_TARGETS = {("prior", "4"): 4.0, ("prior", "1x4"): 3.0, ("decoder", "4"): 1.5}
DECODER_TARGET_RESOLUTION = 128
OVERHEAD_TARGET = ("prior", "4", 0.25)  # everything but forward and backward, share of the lean step (CPU)
LEAN = {"prior": "lean_trimmed", "decoder": "lean"}


def _num(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def _label(node: dict) -> str:
    batch, accumulation = node.get("batch_size"), node.get("accumulation", 1)
    return f"{batch}x{accumulation}" if accumulation > 1 else str(batch)


def setting_nodes(results: dict) -> Iterator[tuple[str, str, dict]]:
    """(trainer, setting label, comparison) for each timed setting, the preset's first."""
    for kind in ("prior", "decoder"):
        node = results["sections"].get(kind)
        if not isinstance(node, dict) or "error" in node or "sides" not in node:
            continue
        yield kind, _label(node), node
        for label, sub in node.get("settings", {}).items():
            yield kind, label, sub


def _target(results: dict, kind: str, label: str, node: dict) -> float | None:
    if results["device"] != "cpu" or results["size"] != "small":
        return None
    if kind == "decoder" and node.get("resolution") != DECODER_TARGET_RESOLUTION:
        return None
    return CPU_TARGETS.get((kind, label))


def _verdict(value: float, target: float | None, higher: bool = True) -> str:
    if target is None:
        return "—"
    met = value >= target if higher else value <= target
    return f"{'≥' if higher else '≤'} {target:g}: {'met' if met else f'**missed** ({value / target:.0%} of it)'}"


def _ms(samples: int, rates: dict) -> str:
    """Milliseconds per optimisation step, median [min–max], from a samples/s summary."""
    return (f"{_num(1e3 * samples / rates['median'])} [{_num(1e3 * samples / rates['max'])}–"
            f"{_num(1e3 * samples / rates['min'])}]")


def settings_table(results: dict) -> list[str]:
    lines = ["| trainer | batch × accumulation | lean ms/step | reference ms/step | lean / reference "
             "(median [min–max]) | target |", "|---|---|---|---|---|---|"]
    for kind, label, node in setting_nodes(results):
        lean, ref = node["sides"].get(LEAN[kind]), node["sides"].get("reference")
        ratio = node["ratios"].get(f"{LEAN[kind]}/reference")
        if not (lean and ref and ratio):
            continue
        samples = node["batch_size"] * node.get("accumulation", 1)
        where = f" at {node['resolution']} px" if kind == "decoder" else ""
        lines.append(f"| {kind}{where} | {label.replace('x', ' × ')} | {_ms(samples, lean)} | {_ms(samples, ref)} | "
                     f"{_num(ratio['median'])}× [{_num(ratio['min'])}–{_num(ratio['max'])}] | "
                     f"{_verdict(ratio['median'], _target(results, kind, label, node))} |")
    return lines if len(lines) > 2 else []


def breakdown_table(results: dict) -> list[str]:
    lines = ["| trainer | batch × accumulation | DataLoader workers | clocked ms/step | "
             + " | ".join(PARTS) + " | all but forward + backward | target |",
             "|---|---|---|---|" + "---|" * len(PARTS) + "---|---|"]
    for kind, label, node in setting_nodes(results):
        for workers, summary in node.get("breakdown", {}).items():
            share = summary["share"]
            rest = summary["not_forward_backward_share"]
            kind_target, label_target, limit = OVERHEAD_TARGET
            target = (limit if results["device"] == "cpu" and (kind, label) == (kind_target, label_target)
                      else None)
            lines.append(f"| {kind} | {label.replace('x', ' × ')} | {workers} | {_num(1e3 * summary['step_s'])} | "
                         + " | ".join(f"{100 * share[p]:.1f}%" for p in PARTS)
                         + f" | {100 * rest:.1f}% | {_verdict(rest, target, higher=False)} |")
    return lines if len(lines) > 2 else []


def compile_lines(results: dict) -> list[str]:
    """Warm-up seconds and graphs compiled per lean side, when the lean sides were compiled."""
    if not results.get("torch_compile"):
        return []
    lines = []
    for kind, label, node in setting_nodes(results):
        for name, side in node["sides"].items():
            if name.startswith("lean") and "warmup_s" in side:
                lines.append(f"- {kind} {label} {side.get('label', name)}: warm-up {side['warmup_s']:.1f} s over "
                             f"{side['warmup_steps']} steps ({side['graphs_compiled_in_warmup']} graph(s) compiled)")
        lines.append(f"- {kind} {label}: graphs compiled during the timed repeats (recompilations): "
                     f"{node.get('graphs_compiled_while_timed', 0)}")
    return ["torch.compile (lean sides; warm-up excluded from the rates):", "", *lines] if lines else []


def blackbox_table(results: dict) -> list[str]:
    node = results["sections"].get("blackbox")
    if not isinstance(node, dict) or "error" in node:
        return []
    lines = ["| trainer | batch × accumulation | `python -m train` ms/step | diffusers script ms/step | "
             "lean / reference (median [min–max]) | unusable repeats |", "|---|---|---|---|---|---|"]
    for kind, run in node.items():
        for label, result in run["settings"].items():
            lean, ref, ratio = result["sides"]["lean"], result["sides"]["reference"], result.get("ratio")
            span = f"{_num(ratio['median'])}× [{_num(ratio['min'])}–{_num(ratio['max'])}]" if ratio else "—"
            lines.append(f"| {kind} | {label.replace('x', ' × ')} | {_num(1e3 * lean['median'])} "
                         f"[{_num(1e3 * lean['min'])}–{_num(1e3 * lean['max'])}] | {_num(1e3 * ref['median'])} "
                         f"[{_num(1e3 * ref['min'])}–{_num(1e3 * ref['max'])}] | {span} | "
                         f"{result['unusable_repeats']} |")
        steps = run["steps"]
        lines.append(f"\n{kind}: `{run['script']}`, runs of {steps[0]} and {steps[1]} steps, {run['repeats']} "
                     "interleaved repeats; per-step time = wall-time difference / step difference.")
    return lines


def step_tables(results: dict) -> list[str]:
    """Every table of this module with its title, for bench_report.render."""
    out = []
    for title, table in (("Training steps by batch setting", settings_table(results)),
                         ("Lean step breakdown (the loop's own step, clocked after the timed repeats)",
                          breakdown_table(results)),
                         ("Black box: the processes themselves", blackbox_table(results))):
        if table:
            out += [f"**{title}**", "", *table, ""]
    compiled = compile_lines(results)
    return out + ([*compiled, ""] if compiled else [])
