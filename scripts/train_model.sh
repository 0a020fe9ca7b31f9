#!/usr/bin/env bash
# Re-create one shipped model from its recipe, resumably (re-run the same command after a crash):
#   bash scripts/train_model.sh ruac|bayes|det [THREADS]
# Trains training/micro-<v>.yaml (its whole 4000-step schedule) in runs/micro-<v>
# (gitignored) and exports it in fp16 into the package. Add --heads to also run the stage-2
# recipe training/micro-<v>-heads.yaml (not what ships: see training/README.md) and export that.
set -euo pipefail
v=${1:-}
threads=${2:-1}
heads=${3:-}
case "$v" in
  ruac) out=micro ;;
  bayes) out=micro-bayes ;;
  det) out=micro-det ;;
  *) echo "usage: $0 ruac|bayes|det [threads] [--heads]" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
train() { .venv/bin/napari-ruac train "$@"; }
train "training/micro-$v.yaml" --run-dir "runs/micro-$v" --threads "$threads" --resume
if [ "$heads" != "--heads" ]; then
  train "training/micro-$v.yaml" --run-dir "runs/micro-$v" --export "src/napari_ruac/weights/$out.pt"
  exit 0
fi
train "training/micro-$v.yaml" --run-dir "runs/micro-$v" --export "runs/micro-$v-stage1.pt" --full-precision
train "training/micro-$v-heads.yaml" --run-dir "runs/micro-$v-heads" --threads "$threads" --resume
train "training/micro-$v-heads.yaml" --run-dir "runs/micro-$v-heads" --export "src/napari_ruac/weights/$out.pt"
