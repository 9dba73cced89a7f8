#!/usr/bin/env bash
# End to end on the built-in tiny default, on CPU, in a few minutes:
# tiny random-weight models + sample data -> precompute -> inspect the cache.
# Everything lands in ${DEMO_DIR:-demo_out}/.
source "$(dirname "$0")/_env.sh"
OUT="${DEMO_DIR:-demo_out}"
mkdir -p "$OUT"
echo "== 1/3 tiny models and sample data"
"$PY" scripts/make_tiny_models.py --size tiny --out "$OUT/models"
"$PY" scripts/make_sample_data.py --out "$OUT/data"
echo "== 2/3 precompute (CLIP text + CLIP vision + MoVQ, once)"
"$PY" -m precompute \
  --pretrained_prior_model_name_or_path "$OUT/models/prior" \
  --pretrained_decoder_model_name_or_path "$OUT/models/decoder" \
  --train_data_dir "$OUT/data/imagefolder" \
  --output_dir "$OUT/cache" --resolution 64 --samples_per_shard 16 --holdout_samples 8 \
  --batch_size 16 --num_workers 2 \
  --validation_prompts "a red circle on a blue background" "a yellow square on a black background"
echo "== 3/3 inspect the cache"
"$PY" scripts/inspect_cache.py "$OUT/cache"
echo
echo "models: $OUT/models   sample data: $OUT/data   cache: $OUT/cache (manifest.json + shards)"
