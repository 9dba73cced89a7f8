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
    return 0


if __name__ == "__main__":
    sys.exit(main())
