"""The command line of scripts/bench.py (its docstring is the --help text)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import bench_setup as setup
import torch

SECTIONS = ("precompute", "cache", "prior", "decoder", "stream", "memory", "lora")
OPTIONAL_SECTIONS = ("update", "blackbox")  # run only when --sections names them (blackbox: or --reference_script)
DEFAULT_DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
DEFAULT_SETTINGS = "1x4,4"  # the diffusers guide's batch 1 x accumulation 4, and batch 4


@dataclasses.dataclass(frozen=True)
class Setting:
    """A batch size per micro-batch and the micro-batches per optimisation step."""

    batch: int
    accumulation: int = 1

    @property
    def label(self) -> str:
        return f"{self.batch}x{self.accumulation}" if self.accumulation > 1 else str(self.batch)

    @property
    def samples(self) -> int:
        return self.batch * self.accumulation


def parse_setting(text: str) -> Setting:
    """"4" -> batch 4; "1x4" -> batch 1 with gradient accumulation 4. Raises ValueError."""
    batch, _, accumulation = text.strip().partition("x")
    setting = Setting(int(batch), int(accumulation or 1))
    if setting.batch < 1 or setting.accumulation < 1:
        raise ValueError(f"batch setting {text!r}: batch and accumulation must be >= 1")
    return setting


def reference_kind(path: Path) -> str:
    """"prior" or "decoder" from a diffusers script's file name (train_text_to_image_prior.py, ..._decoder.py)."""
    kinds = [kind for kind in ("prior", "decoder") if kind in path.name]
    if len(kinds) != 1:
        raise ValueError(f"--reference_script {path}: its name must say prior or decoder, as the diffusers scripts' "
                         "train_text_to_image_prior.py and train_text_to_image_decoder.py do")
    if not path.is_file():
        raise ValueError(f"--reference_script {path}: no such file")
    return kinds[0]


def parse_args(argv: list[str] | None, description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    parser.add_argument("--batch_settings", default=DEFAULT_SETTINGS,
                        help="batch settings timed beside each trainer's preset batch, comma-separated: B (batch B) "
                        "or BxA (batch B, gradient accumulation A); '' for none (default: %(default)s, the "
                        "diffusers guide's setting and batch 4)")
    parser.add_argument("--breakdown_workers",
                        help="DataLoader worker counts the lean step's breakdown is measured with (default: the "
                        "preset's, and 1 too when that is 0)")
    parser.add_argument("--torch_compile", action="store_true",
                        help="lean sides train a torch.compile'd trainee (train --torch_compile); the compile "
                        "warm-up is reported apart and excluded from the rates")
    parser.add_argument("--reference_script", type=Path, action="append", default=[],
                        help="path of diffusers' train_text_to_image_prior.py or _decoder.py (repeat for both): "
                        "the blackbox section times it against `python -m train` (implies --sections blackbox)")
    parser.add_argument("--blackbox_steps", default="10,60",
                        help="the two run lengths (optimisation steps) of the black-box comparison; the per-step "
                        "time is the difference of their wall times over the difference of steps (default: "
                        "%(default)s)")
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
    if args.reference_script and "blackbox" not in args.sections:
        args.sections.append("blackbox")
    unknown = set(args.sections) - set(SECTIONS) - set(OPTIONAL_SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}")
    try:
        args.settings = [parse_setting(s) for s in args.batch_settings.split(",") if s.strip()]
        args.references = {reference_kind(path): path.resolve() for path in args.reference_script}
        args.blackbox_steps = sorted(int(n) for n in args.blackbox_steps.split(","))
    except ValueError as exc:
        parser.error(str(exc))
    if "blackbox" in args.sections and not args.references:
        parser.error("--sections blackbox needs --reference_script PATH (diffusers' train_text_to_image_*.py)")
    if len(args.blackbox_steps) != 2 or args.blackbox_steps[0] < 1 or args.blackbox_steps[0] == args.blackbox_steps[1]:
        parser.error("--blackbox_steps takes two different positive step counts, e.g. 10,60")
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.mixed_precision = args.mixed_precision or ("bf16" if args.device.type == "cuda" else "no")
    if args.size == "full" and args.device.type != "cuda" and not args.toy_full:
        parser.error("--size full builds 5 B parameters: it needs a GPU (see scripts/gpu_bench.sh)")
    preset = setup.PRESETS[args.size]
    args.preset = dataclasses.replace(preset, **{f.name: getattr(args, f.name) for f in dataclasses.fields(preset)
                                                 if getattr(args, f.name) is not None})
    workers = args.preset.num_workers
    args.breakdown_workers = ([int(n) for n in args.breakdown_workers.split(",")] if args.breakdown_workers
                              else [workers] + ([1] if workers == 0 else []))
    args.out_dir = args.out_dir or Path("bench_out") / args.size
    return args
