#!/usr/bin/env bash
# Run the whole test suite on CPU (installs what it needs on first use). Extra arguments go to pytest.
#   scripts/test.sh                    everything, as CI runs it (.ci/run)
#   scripts/test.sh -m "not slow"      the quick loop: skips tests marked slow (training more than a few
#                                      steps, subprocesses such as torchrun or `python -m ...`)
#   scripts/test.sh tests/test_x.py -x one file, stop at the first failure
source "$(dirname "$0")/_env.sh"
exec "$PY" -m pytest "$@"
