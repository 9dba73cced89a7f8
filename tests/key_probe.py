"""`python tests/key_probe.py KEYS_DIR prior FLAGS...` (under torchrun too): the trainer's own command line, with an
objective that records the sample keys of every micro-batch; process RANK writes them to KEYS_DIR/keys-RANK.json
(one list per micro-batch, in training order) and exits with the command's code."""

from __future__ import annotations

import json
import os
import sys

from train import __main__ as cli
from train.loader import KEYS
from train.prior import PriorObjective


class KeyProbe(PriorObjective):
    """The prior objective, recording each batch's sample keys before its loss."""

    batches: list[list[str]] = []

    def loss(self, module, batch):
        KeyProbe.batches.append(list(batch[KEYS]))
        return super().loss(module, batch)


def main() -> int:
    """Run the command of argv[2:] with KeyProbe as the prior objective; write the keys; return its exit code."""
    out = sys.argv[1]
    cli.OBJECTIVES["prior"] = KeyProbe
    code = cli.main(sys.argv[2:])
    with open(os.path.join(out, f"keys-{os.environ.get('RANK', '0')}.json"), "w") as handle:
        json.dump(KeyProbe.batches, handle)
    return code


if __name__ == "__main__":
    sys.exit(main())
