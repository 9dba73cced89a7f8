#!/usr/bin/env bash
# Full-size GPU benchmark in one call (docs/benchmarks.md, "GPU"): the published Kandinsky 2.2
# architectures with random weights, bf16, every section of scripts/bench.py, in under 10 minutes.
#
#   bash scripts/gpu_bench.sh --fetch   # here, with PyPI: download the wheels the GPU image lacks into .whl/
#   bash scripts/gpu_bench.sh           # there (no network): install .whl/ into /tmp/site, run, copy results to $OUT
#
# With the device tool: run(command="bash scripts/gpu_bench.sh", carry=[".whl"], timeout_s=600).
# The GPU image has torch, transformers, accelerate, numpy, pillow, pyarrow (version unknown) and friends,
# but not diffusers, datasets, webdataset: those travel as wheels. .whl/ is git-ignored.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
WHEELS=(diffusers==0.42.1 datasets==5.2.0 webdataset==1.0.2 braceexpand==0.1.7 dill==0.4.1 multiprocess==0.70.19
        importlib_metadata==10.2.0)
PYARROW=pyarrow==26.0.1  # datasets 5.2 needs pyarrow >= 24; installed there only if the image's is older
GPU_PYTHON="${GPU_PYTHON:-3.12}"  # the GPU image's python3 (its wheels must match)
BUDGET_S="${BENCH_BUDGET_S:-540}"  # the whole call must end inside the tool's 600 s limit

if [ "${1:-}" = "--fetch" ]; then
  PY="${PYTHON:-$ROOT/.venv/bin/python}"
  mkdir -p .whl
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$GPU_PYTHON" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}" "$PYARROW"
  ls -la .whl
  du -sh .whl
  exit 0
fi

OUT="${OUT:-$ROOT/bench_out/gpu_out}"
mkdir -p "$OUT"
LOG="$OUT/gpu_bench.log"
exec > >(tee "$LOG") 2>&1
PY="${BENCH_PYTHON:-python3}"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
SITE=/tmp/site
mkdir -p "$SITE"
shopt -s nullglob
wheels=(.whl/*.whl)
if [ ${#wheels[@]} -eq 0 ]; then
  echo "no wheels in .whl/: run 'bash scripts/gpu_bench.sh --fetch' where PyPI is reachable, and carry .whl"
  exit 2
fi
install=()
for w in "${wheels[@]}"; do
  case "$(basename "$w")" in
    pyarrow-*)  # keep the image's pyarrow when it is new enough for datasets 5.2
      if "$PY" -c 'import sys, pyarrow; sys.exit(int(pyarrow.__version__.split(".")[0]) >= 24)' 2>/dev/null; then
        install+=("$w"); fi ;;
    *) install+=("$w") ;;
  esac
done
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${install[@]}"
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
"$PY" - <<'EOF'
import importlib.metadata as m, sys
print("python", sys.version.split()[0], {n: m.version(n) for n in ("torch", "diffusers", "transformers", "accelerate",
      "datasets", "webdataset", "pyarrow", "numpy", "pillow")})
import datasets, diffusers, webdataset, precompute.main, train.loop  # fail here, not after building 5 B parameters
EOF

cp docs/benchmarks.md "$OUT/benchmarks.md" 2>/dev/null || true
set +e
timeout --signal=TERM "$BUDGET_S" "$PY" scripts/bench.py --size full --out_dir bench_out/full \
  --update_docs "$OUT/benchmarks.md" "$@"
status=$?
set -e
cp bench_out/full/results.json bench_out/full/results.md "$OUT/" 2>/dev/null || true
echo "gpu_bench: exit $status; results in $OUT (results.json, results.md, benchmarks.md with the full block)"
exit $status
