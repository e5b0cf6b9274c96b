#!/usr/bin/env bash
# The paper's findings in miniature (docs/findings.md), on the demo's cache and runs: run `make demo`
# first. Each finding trains what it compares beside the demo's own runs and scores it with the
# project's eval commands. Usage: docs/measure/findings.sh [1|2|3|4|base_min_snr ...] (default: the
# four findings).
# Results land in $OUT (default out/findings); about 45 minutes on 2 cores for all four.
set -euo pipefail
cd "$(dirname "$0")/../.."
DEMO=${DEMO_DIR:-out/demo}
OUT=${OUT:-out/findings}
CLI=${CLI:-.venv/bin/imagen-jax}
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
BASE_STEPS=${BASE_STEPS:-300}
SR_STEPS=${SR_STEPS:-150}
flags() {  # the demo cascade's sampling flags with BASE_DIR=$1 and SR_DIR=$2
  echo --gin_file=runs/sample_demo.gin --gin.VOCAB="'$DEMO/spiece.model'" --gin.ENCODER="'$DEMO/t5'" \
    --gin.BASE_DIR="'$1'" --gin.SR_DIR="'$2'"
}
train() {  # train GIN_FILE MODEL_DIR STEPS [gin bindings...]
  local gin=$1 dir=$2 steps=$3
  shift 3
  $CLI train --gin_file="$gin" --gin.MODEL_DIR="'$dir'" --gin.TRAIN_DATA="'$DEMO/cache'" \
    --gin.NUM_STEPS="$steps" "$@"
}
BASE_ONLY=(--gin.cascade_config.stages="[@base/stage()]")
SHAPES=(--num_prompts 64 --batch_size 32 --train_examples 3000 --no_images)

finding_1() {  # guidance weight x thresholding, the demo's base
  $CLI eval shapes $(flags "$DEMO/base" "$DEMO/sr") "${BASE_ONLY[@]}" "${SHAPES[@]}" \
    --guidance 1,3,5,8 --thresholding none,static,dynamic --label "demo base" --out "$OUT/1_guidance"
}

finding_2() {  # noise-conditioning augmentation: the demo's SR against one trained without it
  train runs/demo_sr.gin "$OUT/2_sr_noaug" "$SR_STEPS" \
    --gin.DiffusionConfig.train_aug_level_range="(0.0, 0.0)"
  for sr in "$DEMO/sr" "$OUT/2_sr_noaug"; do
    for aug in 0.0 0.1 0.3; do
      $CLI eval sr-conditioning $(flags "$DEMO/base" "$sr") --num_images 32 --aug_level "sr=$aug" \
        --label "$(basename "$sr") aug $aug" --out "$OUT/2_aug/$(basename "$sr")_aug$aug"
    done
  done
}

finding_3() {  # text conditioning: attention pooling alone against pooling plus attention to the tokens
  train runs/demo_base.gin "$OUT/3_pool_only" "$BASE_STEPS" --gin.UNetConfig.text_attention=False
  for base in "$DEMO/base" "$OUT/3_pool_only"; do
    $CLI eval shapes $(flags "$base" "$DEMO/sr") "${BASE_ONLY[@]}" "${SHAPES[@]}" \
      --guidance 1,3,5 --thresholding dynamic --label "$(basename "$base")" \
      --out "$OUT/3_text/$(basename "$base")"
  done
}

finding_4() {  # Efficient U-Net against the base U-Net as the SR network: step time, memory, quality
  for gin in runs/demo_sr.gin runs/demo_sr_unet.gin; do
    $CLI bench --gin_file=$gin --what train --repeats 5 --warmup 2 \
      --json "$OUT/4_sr_net/bench_$(basename $gin .gin).json"
  done
  # The same wall time for both: the Efficient U-Net's demo steps, the U-Net's steps scaled by the
  # measured step-time ratio.
  unet_steps=$(.venv/bin/python -c "
import json
e = json.load(open('$OUT/4_sr_net/bench_demo_sr.json'))['median_s']
u = json.load(open('$OUT/4_sr_net/bench_demo_sr_unet.json'))['median_s']
print(max(1, round($SR_STEPS * e / u)))")
  train runs/demo_sr_unet.gin "$OUT/4_sr_unet" "$unet_steps" --gin.CHECKPOINT_EVERY="$unet_steps" \
    --gin.SAMPLE_EVERY="$unet_steps"
  for sr in "$DEMO/sr" "$OUT/4_sr_unet"; do
    $CLI eval sr-conditioning $(flags "$DEMO/base" "$sr") --num_images 32 \
      --label "$(basename "$sr")" --out "$OUT/4_sr_net/$(basename "$sr")"
  done
}

base_min_snr() {  # not a paper finding: the demo's base with min-SNR loss weighting (gamma 5)
  train runs/demo_base.gin "$OUT/base_min_snr" "$BASE_STEPS" \
    --gin.DiffusionConfig.loss_weighting="'min_snr'"
  $CLI eval shapes $(flags "$OUT/base_min_snr" "$DEMO/sr") "${BASE_ONLY[@]}" "${SHAPES[@]}" \
    --guidance 1,3,5 --thresholding dynamic --label "min-SNR base" --out "$OUT/base_min_snr_eval"
}

for f in "${@:-1 2 3 4}"; do
  for n in $f; do
    if [[ $n == [0-9] ]]; then "finding_$n"; else "$n"; fi
  done
done
