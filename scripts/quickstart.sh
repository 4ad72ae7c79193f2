#!/usr/bin/env bash
# Quick start: generate a small shapes dataset, train a captioner on it (about a minute on 2 CPU
# cores, encoder features computed once), then caption the example images in assets/examples.
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
  --min-word-count 1 --lr 2e-3 --dropout 0.2 --seed 0 $quiet
echo "--- captions of assets/examples (model: $work/run/best.pt)"
captioner caption assets/examples --model "$work/run/best.pt"
