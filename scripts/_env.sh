# Sourced by scripts/test.sh and scripts/demo.sh: pick or make a Python environment with the project installed.
# - An active virtualenv/conda env is used as it is (so a CUDA torch already there is kept).
# - Otherwise a .venv is created in the repository.
# torch is installed only when none is importable: `torch==2.13.0` (a CPU wheel lies on the dev machines),
# else the CPU build from the PyTorch index, never the multi-GB CUDA build by accident.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ] && command -v python >/dev/null; then
  PY="$(command -v python)"
else
  [ -x .venv/bin/python ] || python3 -m venv .venv
  PY="$ROOT/.venv/bin/python"
fi
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "[env] installing torch (CPU)" >&2
  "$PY" -m pip install -q torch==2.13.0 2>/dev/null \
    || "$PY" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
fi
STAMP="$("$PY" -c 'import sys,hashlib;print(hashlib.sha256(open("pyproject.toml","rb").read()).hexdigest()[:16])')"
if [ ! -f ".venv-stamp-$STAMP" ] || ! "$PY" -c "import precompute, train" >/dev/null 2>&1; then
  echo "[env] installing the project and its test extras" >&2
  "$PY" -m pip install -q -e ".[test]"
  rm -f .venv-stamp-* && touch ".venv-stamp-$STAMP"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
