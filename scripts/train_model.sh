#!/usr/bin/env bash
# Re-create one shipped model from its recipes, resumably (re-run the same command after a crash):
#   bash scripts/train_model.sh ruac|bayes|det [THREADS]
# Stage 1: training/micro-<v>.yaml for 3000 steps (of its 4000-step schedule), exported in fp32.
# Stage 2: training/micro-<v>-heads.yaml (object score, multimask tokens, IoU head), 500 steps,
# exported in fp16 into the package. Runs live in runs/ (gitignored).
set -euo pipefail
v=${1:-}
threads=${2:-1}
case "$v" in
  ruac) out=micro ;;
  bayes) out=micro-bayes ;;
  det) out=micro-det ;;
  *) echo "usage: $0 ruac|bayes|det [threads]" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
train() { .venv/bin/napari-ruac train "$@"; }
train "training/micro-$v.yaml" --run-dir "runs/micro-$v" --threads "$threads" --resume --max-steps 3000
train "training/micro-$v.yaml" --run-dir "runs/micro-$v" --export "runs/micro-$v-stage1.pt" --full-precision
train "training/micro-$v-heads.yaml" --run-dir "runs/micro-$v-heads" --threads "$threads" --resume
train "training/micro-$v-heads.yaml" --run-dir "runs/micro-$v-heads" --export "src/napari_ruac/weights/$out.pt"
