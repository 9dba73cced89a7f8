"""The training-step sections of scripts/bench.py: prior, decoder (lean vs reference at each batch setting,
with the lean step's breakdown), stream and blackbox. `Bench` (bench.py) mixes them in."""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections import deque

from bench_args import Setting
from bench_timing import Side, alternate


class TrainerSections:
    """Sections timing training steps; the host class provides args, p, device, accelerator, paths and log."""

    def preset_setting(self, command: str) -> Setting:
        return Setting(self.p.prior_batch_size if command == "prior" else self.p.decoder_batch_size)

    def steps_at(self, command: str, setting: Setting) -> int:
        """Timed steps per repeat: as many samples per measurement as the preset's steps at the preset batch."""
        return max(self.p.steps, math.ceil(self.p.steps * self.preset_setting(command).samples / setting.samples))

    def lean_argv(self, command: str, setting: Setting | None = None, trim_padding: bool = True,
                  workers: int | None = None, extra: tuple[str, ...] = ()) -> list[str]:
        """`python -m train <command>` flags of a lean side on the benchmark cache, plus `extra` flags."""
        from bench_steps import lean_argv

        setting = setting or self.preset_setting(command)
        workers = self.p.num_workers if workers is None else workers
        return lean_argv(command, self.ensure_cache(), self.prior_dir, self.decoder_dir, setting.batch, workers,
                         self.work / "train_out", self.p.resolution, trim_padding, setting.accumulation,
                         (*(("--torch_compile",) if self.args.torch_compile else ()), *extra))

    def lean(self, command: str, setting: Setting | None = None, trim_padding: bool = True, share=None,
             workers: int | None = None, extra: tuple[str, ...] = ()):
        from bench_steps import LeanTrainer

        return LeanTrainer(command, self.lean_argv(command, setting, trim_padding, workers, extra), self.accelerator,
                           share)

    def timing(self, sides: list[Side], ratios: list[tuple[str, str]], count: bool = True,
               steps: int | None = None) -> dict:
        # No FLOP counting with --torch_compile: a first call under FlopCounterMode (a dispatch mode) makes
        # dynamo skip the trainee's frame for good, so the "compiled" side would run eagerly (measured).
        return alternate(sides, repeats=self.p.repeats, steps=steps or self.p.steps, warmup=self.p.warmup,
                         device=self.device, ratios=ratios, log=self.log, count=count and not self.args.torch_compile)

    def compare(self, command: str, setting: Setting, with_77: bool = False) -> dict:
        """Lean vs reference (and, for the prior, the 77-token lean step) at one batch setting, interleaved;
        then the lean step's breakdown."""
        from bench_reference import ReferenceDecoder, ReferencePrior

        self.log(f"{command}: batch {setting.batch} x accumulation {setting.accumulation}")
        lean = self.lean(command, setting)
        name = "lean_trimmed" if command == "prior" else "lean"
        sides = [Side(name, lean.stream_step, "lean, trimmed" if command == "prior" else "lean")]
        ratios = [(name, "reference")]
        full = None
        if with_77:  # the same trainee and optimizer: one AdamW state for both lean sides
            full = self.lean("prior", setting, trim_padding=False, share=lean)
            sides.append(Side("lean_77", full.stream_step, "lean, 77 tokens"))
            ratios += [("lean_77", "reference"), ("lean_trimmed", "lean_77")]
        if command == "prior":  # the trainee is shared (same speed whatever its weights), its optimizer is its own
            reference = ReferencePrior(self.prior_dir, self.data, self.accelerator, setting.batch, self.p.num_workers,
                                       self.hf_cache, share=lean, accumulation=setting.accumulation)
        else:
            reference = ReferenceDecoder(self.prior_dir, self.decoder_dir, self.data, self.accelerator, setting.batch,
                                         self.p.num_workers, self.p.resolution, self.hf_cache, share=lean,
                                         accumulation=setting.accumulation)
        sides.append(Side("reference", reference.step, "reference"))
        steps = self.steps_at(command, setting)
        result = self.timing(sides, ratios, steps=steps)
        result.update(batch_size=setting.batch, accumulation=setting.accumulation, steps_per_repeat=steps)
        if command == "prior":
            result["mean_text_tokens"] = {"lean_trimmed": statistics.mean(lean.text_tokens), "reference": 77}
            if full is not None:
                result["mean_text_tokens"]["lean_77"] = statistics.mean(full.text_tokens)
        else:
            result["resolution"] = self.p.resolution
        result["breakdown"] = self.breakdown(command, setting, lean, steps)
        del lean, full, reference, sides
        self.accelerator.free_memory()  # the next setting's sides need not share the device with these
        gc.collect()
        return result

    def breakdown(self, command: str, setting: Setting, lean, steps: int) -> dict:
        """The lean step split into data / forward / backward / optimizer / other, per DataLoader worker count."""
        from bench_breakdown import clocked

        out = {}
        for workers in self.args.breakdown_workers:
            trainer = lean
            if workers != self.p.num_workers:  # same trainee and optimizer, a loader with `workers` workers
                trainer = self.lean(command, setting, share=lean, workers=workers)
                for _ in range(self.p.warmup):
                    trainer.stream_step()  # starts the workers
            out[str(workers)] = clocked(trainer, self.p.repeats * steps, self.device)
            if trainer is not lean:
                trainer.loader.close()
            shares = ", ".join(f"{k} {100 * v:.1f}%" for k, v in out[str(workers)]["share"].items())
            self.log(f"  breakdown, {workers} worker(s): {shares}")
        return out

    def settings(self, command: str) -> dict:
        """The comparisons at each --batch_settings other than the preset's."""
        preset = self.preset_setting(command)
        return {s.label: self.compare(command, s) for s in self.args.settings if s != preset}

    def section_prior(self) -> dict:
        result = self.compare("prior", self.preset_setting("prior"), with_77=True)
        result["settings"] = self.settings("prior")
        return result

    def section_decoder(self) -> dict:
        result = self.compare("decoder", self.preset_setting("decoder"))
        result["settings"] = self.settings("decoder")
        return result

    def section_blackbox(self) -> dict:
        from bench_blackbox import blackbox

        paths = {"prior": self.prior_dir, "decoder": self.decoder_dir, "data": self.data, "hf_cache": self.hf_cache,
                 "cache": self.ensure_cache()}
        settings = self.args.settings or [self.preset_setting("prior")]
        return {kind: blackbox(kind, script, settings, paths, self.work / "blackbox", steps=self.args.blackbox_steps,
                               repeats=self.p.repeats, resolution=self.p.resolution, log=self.log)
                for kind, script in self.args.references.items()}

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

