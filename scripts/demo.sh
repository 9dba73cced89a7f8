#!/usr/bin/env bash
# End to end on the built-in tiny default, on CPU, in a few minutes:
# tiny random-weight models + sample data -> precompute -> train prior -> train decoder
# -> one image from a prompt through diffusers' AutoPipelineForText2Image with both trained parts
# -> LoRA adapters (--rank) for both on the base models, loaded by load_lora_adapter, one more image
#    (skip this last step with DEMO_LORA=0).
# Everything lands in ${DEMO_DIR:-demo_out}/.
source "$(dirname "$0")/_env.sh"
OUT="${DEMO_DIR:-demo_out}"
mkdir -p "$OUT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # tiny models: threads cost more than they give
echo "== 1/6 tiny models and sample data"
"$PY" scripts/make_tiny_models.py --size tiny --out "$OUT/models"
"$PY" scripts/make_sample_data.py --out "$OUT/data" --num_images 256
echo "== 2/6 precompute (CLIP text + CLIP vision + MoVQ, once)"
"$PY" -m precompute \
  --pretrained_prior_model_name_or_path "$OUT/models/prior" \
  --pretrained_decoder_model_name_or_path "$OUT/models/decoder" \
  --train_data_dir "$OUT/data/imagefolder" \
  --output_dir "$OUT/cache" --resolution 64 --samples_per_shard 32 --holdout_samples 32 \
  --batch_size 32 --num_workers 2 \
  --validation_prompts "a red circle on a blue background" "a yellow square on a black background"
"$PY" scripts/inspect_cache.py "$OUT/cache"
echo "== 3/6 train the prior from the cache (no CLIP loaded; validation prompts rendered by the base decoder)"
"$PY" -m train prior --shards "$OUT/cache" --output_dir "$OUT/prior-ft" \
  --pretrained_prior_model_name_or_path "$OUT/models/prior" \
  --pretrained_decoder_model_name_or_path "$OUT/models/decoder" \
  --train_batch_size 32 --learning_rate 1e-3 --lr_warmup_steps 0 --use_ema --max_train_steps 300 \
  --validation_steps 150 --checkpointing_steps 150 --checkpoints_total_limit 1 --seed 0 --report_to none
echo "== 4/6 train the decoder from the cache (no CLIP, no MoVQ encoder loaded)"
"$PY" -m train decoder --shards "$OUT/cache" --output_dir "$OUT/decoder-ft" \
  --pretrained_decoder_model_name_or_path "$OUT/models/decoder" \
  --pretrained_prior_model_name_or_path "$(cd "$OUT" && pwd)/prior-ft" --resolution 64 \
  --train_batch_size 16 --learning_rate 1e-3 --lr_warmup_steps 0 --max_train_steps 100 \
  --validation_steps 100 --checkpointing_steps 100 --checkpoints_total_limit 1 --seed 0 --report_to none
echo "== 5/6 generate with AutoPipelineForText2Image (trained prior + trained decoder)"
"$PY" scripts/generate.py "$OUT/decoder-ft" "a red circle on a blue background" --out "$OUT/generated.png"
if [ "${DEMO_LORA:-1}" != 0 ]; then
  echo "== 6/6 LoRA: rank-4 adapters on the base prior and decoder (base frozen), loaded with load_lora_adapter"
  LORA_FLAGS=(--rank 4 --learning_rate 1e-3 --lr_warmup_steps 0 --validation_steps 0 --checkpointing_steps 1000
              --seed 0 --report_to none)
  "$PY" -m train prior --shards "$OUT/cache" --output_dir "$OUT/prior-lora" \
    --pretrained_prior_model_name_or_path "$OUT/models/prior" --pretrained_decoder_model_name_or_path "$OUT/models/decoder" \
    --train_batch_size 32 --max_train_steps 40 "${LORA_FLAGS[@]}"
  "$PY" -m train decoder --shards "$OUT/cache" --output_dir "$OUT/decoder-lora" \
    --pretrained_decoder_model_name_or_path "$OUT/models/decoder" \
    --pretrained_prior_model_name_or_path "$(cd "$OUT" && pwd)/prior-lora" --resolution 64 \
    --train_batch_size 16 --max_train_steps 40 "${LORA_FLAGS[@]}"
  "$PY" scripts/generate.py "$OUT/decoder-lora" "a red circle on a blue background" \
    --out "$OUT/generated-lora.png"
fi
echo
echo "models:        $OUT/models"
echo "sample data:   $OUT/data"
echo "cache:         $OUT/cache (manifest.json + shards)"
echo "prior:         $OUT/prior-ft (KandinskyV22PriorPipeline folder, validation/prior-*.png, loss_curve.png)"
echo "decoder:       $OUT/decoder-ft (KandinskyV22Pipeline folder, validation/decoder*-*.png, loss_curve.png)"
echo "image:         $OUT/generated.png"
if [ "${DEMO_LORA:-1}" != 0 ]; then
  echo "LoRA:          $OUT/prior-lora, $OUT/decoder-lora (base pipeline + pytorch_lora_weights.safetensors; see"
  echo "               their README.md for the load_lora_adapter call), image $OUT/generated-lora.png"
fi
