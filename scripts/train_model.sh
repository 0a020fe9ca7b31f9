#!/usr/bin/env bash
# Re-create one shipped model from its recipes, resumably (re-run the same command after a crash):
#   bash scripts/train_model.sh ruac|bayes|det [THREADS]
# Stage 1 (training/micro-<v>.yaml, 4000 steps) in runs/micro-<v>, its fp32 export
# runs/micro-<v>-stage1.pt, then stage 1c (training/micro-<v>-long.yaml, 3000 more steps) in
# runs/micro-<v>-long (all gitignored), exported in fp16 into the package: what ships. With a
# third argument --heads it runs the stage-2 recipe training/micro-<v>-heads.yaml on top of
# stage 1 instead (an experiment, not what ships: see training/README.md) and exports that.
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
train "training/micro-$v.yaml" --run-dir "runs/micro-$v" --export "runs/micro-$v-stage1.pt" --full-precision
next=long
[ "$heads" = "--heads" ] && next=heads
train "training/micro-$v-$next.yaml" --run-dir "runs/micro-$v-$next" --threads "$threads" --resume
train "training/micro-$v-$next.yaml" --run-dir "runs/micro-$v-$next" --export "src/napari_ruac/weights/$out.pt"
