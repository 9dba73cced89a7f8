#!/usr/bin/env bash
# Run the whole test suite on CPU (installs what it needs on first use). Extra arguments go to pytest.
source "$(dirname "$0")/_env.sh"
exec "$PY" -m pytest "$@"
