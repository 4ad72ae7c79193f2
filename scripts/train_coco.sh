#!/usr/bin/env bash
# COCO 2017 captions, end to end: the bundled model's recipe (scripts/train_flickr8k.sh) at COCO's
# size, on one GPU when there is one (CPU otherwise). See docs/coco.md for the plan, the disk it
# needs and the time it should take (estimated: nothing here was run on a GPU or on all of COCO).
#
#   COCO=/data/coco OUT=runs/coco bash scripts/train_coco.sh
#
# $COCO is the folder COCO 2017 unpacks into: annotations/captions_train2017.json with train2017/,
# annotations/captions_val2017.json with val2017/ (118,287 + 5,000 photos, 591,753 + 25,014 captions).
#   0. validate-data on both sets (once; a problem stops the recipe, before any training);
#   1. "xe": cross-entropy training of the attention decoder with the encoder frozen; Lite0 features
#      of every photo are extracted once into the feature cache (about 16 GB for COCO 2017);
#   2. "ft": the last 2 Lite0 blocks fine-tuned too, from the cached trunk (the frozen layers' output,
#      computed once: about 4.5 GB with the mirror images), with the flip augmentation, starting from
#      xe's best.pt at a quarter of its learning rate;
#   3. beam-search settings measured on val (`captioner tune`);
#   4. guidance and confidence (`captioner calibrate`) fitted on CAL_PHOTOS training photos (the
#      fine-tuned encoder's features of each are extracted again, with one loader process: all
#      118k would take 15 GB more and far longer, for a person classifier and 32 centroids) and the
#      val photos; the measured decoding settings become the model's defaults; fp16 weights;
#   5. the model scored on val.
# Resumable: run it again after a stop; each training stage continues from its last whole epoch
# (`--resume`) and finished steps are skipped.
#
# Settings (environment): with CUDA, --amp bf16, BATCH 256 and one loader process per core but two
# (at most 16); on the CPU, BATCH 64 (the Flickr8k recipe's) and --amp bf16 only where the CPU has
# AVX512-BF16 or AMX. The learning rates follow the batch (Adam: by the square root of the batch /
# 64, docs/scaling-out.md): 4e-4 (stage 1) and 1e-4 (stage 2) at 64. BATCH 256 was chosen for
# speed from the estimate (docs/coco.md); it was not checked against 64 on COCO.
#   EPOCHS (8) FT_EPOCHS (EPOCHS/2) BATCH LR FT_LR AMP WORKERS DEVICE (auto) COMPILE (0; 1: --compile)
#   BEAMS (1,3,5) CAL_PHOTOS (20000; 0: all) MIN_WORDS (5) MODEL_OUT ($OUT/captioner-coco.pt)
#   QUIET (unset; 1: no progress bars) PYTHON (python)
set -euo pipefail
absolute() { case $1 in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
C=$(absolute "${COCO:?set COCO to the folder holding annotations/, train2017/ and val2017/}")
OUT=$(absolute "${OUT:-runs/coco}")
MODEL=$(absolute "${MODEL_OUT:-$OUT/captioner-coco.pt}")
cd "$(dirname "$0")/.."  # python -m captioner then runs this checkout, installed or not
PY=${PYTHON:-python}
cap() { "$PY" -m captioner "$@"; }
TRAIN_JSON=$C/annotations/captions_train2017.json
VAL_JSON=$C/annotations/captions_val2017.json
TRAIN_IMAGES=$C/train2017
VAL_IMAGES=$C/val2017
mkdir -p "$OUT"

DEVICE=${DEVICE:-auto}
if [[ $DEVICE == auto ]]; then
  GPU=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")
else
  GPU=$([[ $DEVICE == cuda* ]] && echo 1 || echo 0)
fi
CORES=$(nproc)
if [[ $GPU == 1 ]]; then
  BATCH=${BATCH:-256}
  AMP=${AMP:-bf16}
  WORKERS=${WORKERS:-$((CORES > 18 ? 16 : (CORES > 3 ? CORES - 2 : 1)))}
else
  BATCH=${BATCH:-64}
  AMP=${AMP:-$(grep -qw -e avx512_bf16 -e amx_bf16 /proc/cpuinfo 2>/dev/null && echo bf16 || echo off)}
  WORKERS=${WORKERS:-1}
fi
rate() { awk -v base="$1" -v b="$BATCH" 'BEGIN { printf "%.3g", base * sqrt(b / 64) }'; }
LR=${LR:-$(rate 4e-4)}
FT_LR=${FT_LR:-$(rate 1e-4)}
EPOCHS=${EPOCHS:-8}
FT_EPOCHS=${FT_EPOCHS:-$(((EPOCHS + 1) / 2))}
BEAMS=${BEAMS:-1,3,5}
CAL_PHOTOS=${CAL_PHOTOS:-20000}
MIN_WORDS=${MIN_WORDS:-5}
QUIETLY=(${QUIET:+--quiet})
RUN=(--device "$DEVICE" --num-workers "$WORKERS" --amp "$AMP" --batch-size "$BATCH" --seed 0 "${QUIETLY[@]}")
if [[ ${COMPILE:-0} == 1 ]]; then RUN+=(--compile); fi
echo "train_coco: $([[ $GPU == 1 ]] && echo GPU || echo CPU): --batch-size $BATCH --amp $AMP --num-workers $WORKERS," \
  "lr $LR / $FT_LR, $EPOCHS + $FT_EPOCHS epochs -> $OUT"

# 0. the data, checked once
if [[ ! -f $OUT/validated ]]; then
  cap validate-data --annotations "$TRAIN_JSON" --images "$TRAIN_IMAGES" "${QUIETLY[@]}"
  cap validate-data --annotations "$VAL_JSON" --images "$VAL_IMAGES" "${QUIETLY[@]}"
  touch "$OUT/validated"
fi

DATA=(--train-annotations "$TRAIN_JSON" --train-images "$TRAIN_IMAGES"
  --val-annotations "$VAL_JSON" --val-images "$VAL_IMAGES")
stage() { # stage RUN FLAGS...: train into RUN, continuing it when it has a last.pt; the final model
  local run=$1 # is calibrated in step 4, so the stages skip the end-of-run calibration
  shift
  if [[ -f $run/last.pt ]]; then
    cap train "${DATA[@]}" --out "$run" "$@" "${RUN[@]}" --no-calibrate --resume
  else
    cap train "${DATA[@]}" --out "$run" "$@" "${RUN[@]}" --no-calibrate
  fi
}

# 1-2. the two training stages
stage "$OUT/xe" --decoder attention --min-word-count "$MIN_WORDS" --epochs "$EPOCHS" --lr "$LR"
stage "$OUT/ft" --init-from "$OUT/xe/best.pt" --fine-tune-encoder 2 --flip --epochs "$FT_EPOCHS" \
  --lr "$FT_LR" --encoder-lr "$FT_LR"

# 3. decoding settings, measured on val (again whenever ft/best.pt changed)
if [[ ! $OUT/decoding.json -nt $OUT/ft/best.pt ]]; then
  cap tune --model "$OUT/ft/best.pt" --annotations "$VAL_JSON" --images "$VAL_IMAGES" --device "$DEVICE" \
    --beam-sizes "$BEAMS" --length-penalties 0,1 --no-repeat-ngrams 0,2 "${QUIETLY[@]}" \
    --out "$OUT/decoding.json" | tee "$OUT/decoding.md"
fi

# 4. guidance and confidence on CAL_PHOTOS training photos and the val photos: the model file
if [[ ! $MODEL -nt $OUT/decoding.json ]]; then
  CAL_JSON=$TRAIN_JSON
  if [[ $CAL_PHOTOS != 0 ]]; then
    CAL_JSON=$OUT/calibration_train.json
    "$PY" - "$TRAIN_JSON" "$CAL_JSON" "$CAL_PHOTOS" <<'EOF'
import json, sys
source, target, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
data = json.load(open(source, encoding="utf-8"))
images = data["images"][:n]  # the file's first n photos, with their captions
ids = {im["id"] for im in images}
subset = {"images": images, "annotations": [a for a in data["annotations"] if a["image_id"] in ids]}
json.dump(subset, open(target, "w", encoding="utf-8"))
EOF
  fi
  cap calibrate --model "$OUT/ft/best.pt" --train-annotations "$CAL_JSON" --train-images "$TRAIN_IMAGES" \
    --val-annotations "$VAL_JSON" --val-images "$VAL_IMAGES" --decoding "$OUT/decoding.json" \
    --device "$DEVICE" "${QUIETLY[@]}" --out "$MODEL" | tee "$OUT/calibration.md"
fi

# 5. the model on val, with its own settings
if [[ ! $OUT/val_scores.json -nt $MODEL ]]; then
  cap evaluate --model "$MODEL" --annotations "$VAL_JSON" --images "$VAL_IMAGES" --device "$DEVICE" --quiet \
    >"$OUT/val_scores.json"
  cat "$OUT/val_scores.json"
fi
echo "train_coco: the model is $MODEL"
