#!/usr/bin/env bash
# Training demo: generate a small shapes dataset, train a captioner on it (under two minutes on 2 CPU
# cores, encoder features computed once), then caption the held-back shapes.
# Everything lands in runs/quickstart (override with QUICKSTART_DIR); nothing is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
work=${QUICKSTART_DIR:-runs/quickstart}
quiet=${QUIET:+--quiet}

python -m captioner.synthetic "$work/data" --per-combo 5 >/dev/null
captioner train \
  --train-annotations "$work/data/train.json" --train-images "$work/data/train" \
  --val-annotations "$work/data/test.json" --val-images "$work/data/test" \
  --out "$work/run" --epochs 15 --batch-size 32 --embed-size 128 --hidden-size 256 \
  --min-word-count 1 --lr 2e-3 --dropout 0.2 --seed 0 --overwrite $quiet  # a demo: run again, start again
echo "--- captions of the held-back shapes (model: $work/run/best.pt)"
captioner caption "$work/data/test" --model "$work/run/best.pt"
