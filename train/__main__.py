"""`python -m train prior|decoder [flags]` (also under `accelerate launch -m train ...` or torchrun)."""

from __future__ import annotations

import logging
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # before transformers is imported

from .config import parse_config  # noqa: E402
from precompute.shard_index import CorruptRecord  # noqa: E402
from precompute.verify import CorruptShard  # noqa: E402

from .decoder import DecoderObjective  # noqa: E402
from .guard import Stopped  # noqa: E402
from .loop import Refused, train  # noqa: E402
from .prior import PriorObjective  # noqa: E402

# command -> objective class; each objective class names its config class (`config_class`).
OBJECTIVES = {"prior": PriorObjective, "decoder": DecoderObjective}
USAGE = "usage: python -m train {prior,decoder} [--help | flags]"


def load_objective_class(command: str) -> type:
    """The objective class of `command` ("prior" or "decoder"); KeyError for another command."""
    return OBJECTIVES[command]


def main(argv: list[str] | None = None) -> int:
    """Parse the command and its flags, train, and return the exit code.

    2: refused before step 1, or stopped mid-run by a corrupt record or a non-finite step; the
    reason is one line on stderr (`train prior: error: ...`), never a traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in OBJECTIVES:
        print(USAGE, file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, flags = argv[0], argv[1:]
    objective_class = load_objective_class(command)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        config = parse_config(objective_class.config_class, flags, prog=f"python -m train {command}")
    except ValueError as exc:  # a flag value refused by the config
        print(f"train {command}: error: {exc}", file=sys.stderr)
        return 2
    try:
        train(config, objective_class(config))
    except (Refused, Stopped, CorruptRecord, CorruptShard) as exc:  # before step 1, or bad data / a NaN mid-run
        print(f"train {command}: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        if not lost_a_peer(exc):
            raise
        rank = os.environ.get("RANK", "?")
        print(f"train {command}: error: process {rank} stopped because another one did (its error says why): "
              f"{str(exc).splitlines()[0][:200]}", file=sys.stderr)
        return 1
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
