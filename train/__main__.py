"""`kandinsky-train prior|decoder [flags]`, also `python -m train ...` (and under `accelerate launch` or torchrun)."""

from __future__ import annotations

import logging
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # before transformers is imported

from .config import parse_job  # noqa: E402
from precompute.launcher import lone_process_problem  # noqa: E402
from precompute.shard_index import CorruptRecord  # noqa: E402
from precompute.verify import CorruptShard  # noqa: E402

from .decoder import DecoderObjective  # noqa: E402
from .hub import HubError, create_hub_repo, is_main_rank, push_output  # noqa: E402
from .guard import Stopped  # noqa: E402
from .loop import Refused, train  # noqa: E402
from .prior import PriorObjective  # noqa: E402
from .storage import discard_staging  # noqa: E402

# command -> objective class; each objective class names its config class (`config_class`).
OBJECTIVES = {"prior": PriorObjective, "decoder": DecoderObjective}
CONSOLE_SCRIPT = "kandinsky-train"


def program() -> str:
    """How this process was invoked, for usage lines: the console script or `python -m train`."""
    return CONSOLE_SCRIPT if os.path.basename(sys.argv[0]).startswith(CONSOLE_SCRIPT) else "python -m train"


def fail(command: str, exc: Exception, code: int) -> int:
    """Print `exc` as the command's one error line (library messages often run over several); return `code`."""
    print(f"train {command}: error: {' '.join(str(exc).split())}", file=sys.stderr)
    return code


def load_objective_class(command: str) -> type:
    """The objective class of `command` ("prior" or "decoder"); KeyError for another command."""
    return OBJECTIVES[command]


def dry_run(command: str, config, options) -> int:
    """`--dry_run` (train/dry_run.py): print the estimate; 0, or 2 with one line for an unreadable cache or config."""
    from .dry_run import main as estimate

    try:
        return estimate(command, config, options)
    except (ValueError, OSError, CorruptShard) as exc:
        return fail(command, exc, 2)


def main(argv: list[str] | None = None) -> int:
    """Parse the command and its flags, train (and push to the hub), and return the exit code.

    2: refused before step 1 (bad flag or value, unfit cache or model, hub repository not creatable),
    or stopped mid-run by a corrupt record or a non-finite step; 1: another process of the job
    stopped, or the job trained and saved but the upload to the hub failed. The reason is one line
    on stderr (`train prior: error: ...`), never a traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in OBJECTIVES:
        print(f"usage: {program()} {{prior,decoder}} [--help | flags]", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, flags = argv[0], argv[1:]
    objective_class = load_objective_class(command)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        config, options = parse_job(objective_class.config_class, flags, prog=f"{program()} {command}")
        if problem := lone_process_problem():  # a launcher's lone process: it would train alone, silently
            raise ValueError(problem)
        if options.dry_run:
            return dry_run(command, config, options)
        repo_id = create_hub_repo(config) if config.push_to_hub and is_main_rank() else None
    except (ValueError, HubError) as exc:  # a flag value refused by the config; the hub refusing the repository
        return fail(command, exc, 2)
    if repo_id is not None:
        config.hub_model_id = repo_id  # the full id (namespace/name): the model card's usage names it
    try:
        train(config, objective_class(config))
    except (Refused, Stopped, CorruptRecord, CorruptShard) as exc:  # before step 1, or bad data / a NaN mid-run
        return fail(command, exc, 2)
    except RuntimeError as exc:
        if not lost_a_peer(exc):
            raise
        rank = os.environ.get("RANK", "?")
        print(f"train {command}: error: process {rank} stopped because another one did (its error says why): "
              f"{str(exc).splitlines()[0][:200]}", file=sys.stderr)
        return 1
    if repo_id is not None:
        try:
            push_output(config, repo_id)
        except HubError as exc:
            return fail(command, exc, 1)
        print(f"Uploaded {config.output_dir} to https://huggingface.co/{repo_id}")
        discard_staging(config)  # a URL --output_dir: the staged copy was kept for this upload
    return 0


# What the gloo and NCCL backends raise in a process whose peer has exited (the launcher then stops it).
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted")


def lost_a_peer(error: RuntimeError) -> bool:
    """Whether `error` is a collective failing because another process of the job exited.

    Under torchrun, a process that stops on a corrupt record exits with its one line; the others,
    waiting in a collective, fail at once, before the launcher stops them: they say so in one line
    too instead of a traceback. Any other RuntimeError is a bug and keeps its traceback.
    """
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and any(sign in str(error) for sign in PEER_LOST)


if __name__ == "__main__":
    sys.exit(main())
