#!/usr/bin/env bash
# Re-create one shipped model from its recipes, resumably (re-run the same command after a crash):
#   bash scripts/train_model.sh ruac|bayes|det [THREADS]
# Stage 1 (training/micro-<v>.yaml, 4000 steps) in runs/micro-<v>, its fp32 export
# runs/micro-<v>-stage1.pt, then stage 1c (training/micro-<v>-long.yaml, 3000 more steps) in
# runs/micro-<v>-long and its fp32 export runs/micro-<v>-stage1c.pt, then stage 1d
# (training/micro-<v>-edge.yaml, 2000 more steps with the annotation-like synthetic labels) in
# runs/micro-<v>-edge and its fp32 export runs/micro-<v>-stage1d.pt, then stage 1f
# (training/micro-<v>-calib.yaml, 300 steps of the output head only, the Bayesian ones trained on
# their analytic predictive logit) in runs/micro-<v>-calib (all gitignored), exported in fp16
# into the package: what ships. With a
# third argument --heads it runs the stage-2 recipe training/micro-<v>-heads.yaml on top of
# stage 1 instead (an experiment, not what ships: see training/README.md) and exports that; with
# --more it goes on after stage 1d with stage 1e (training/micro-<v>-more.yaml, 2000 more steps, an
# experiment, not shipped) in runs/micro-<v>-more and exports that to runs/micro-<v>-stage1e.pt (not the package).
set -euo pipefail
v=${1:-}
threads=${2:-1}
heads=${3:-}
case "$v" in
  ruac) out=micro ;;
  bayes) out=micro-bayes ;;
  det) out=micro-det ;;
  *) echo "usage: $0 ruac|bayes|det [threads] [--heads|--more]" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
train() { .venv/bin/napari-ruac train "$@"; }
train "training/micro-$v.yaml" --run-dir "runs/micro-$v" --threads "$threads" --resume
train "training/micro-$v.yaml" --run-dir "runs/micro-$v" --export "runs/micro-$v-stage1.pt" --full-precision
if [ "$heads" = "--heads" ]; then
  train "training/micro-$v-heads.yaml" --run-dir "runs/micro-$v-heads" --threads "$threads" --resume
  train "training/micro-$v-heads.yaml" --run-dir "runs/micro-$v-heads" --export "src/napari_ruac/weights/$out.pt"
  exit 0
fi
train "training/micro-$v-long.yaml" --run-dir "runs/micro-$v-long" --threads "$threads" --resume
train "training/micro-$v-long.yaml" --run-dir "runs/micro-$v-long" --export "runs/micro-$v-stage1c.pt" --full-precision
train "training/micro-$v-edge.yaml" --run-dir "runs/micro-$v-edge" --threads "$threads" --resume
train "training/micro-$v-edge.yaml" --run-dir "runs/micro-$v-edge" --export "runs/micro-$v-stage1d.pt" --full-precision
if [ "$heads" = "--more" ]; then
  train "training/micro-$v-more.yaml" --run-dir "runs/micro-$v-more" --threads "$threads" --resume
  train "training/micro-$v-more.yaml" --run-dir "runs/micro-$v-more" --export "runs/micro-$v-stage1e.pt"
  exit 0
fi
train "training/micro-$v-calib.yaml" --run-dir "runs/micro-$v-calib" --threads "$threads" --resume
train "training/micro-$v-calib.yaml" --run-dir "runs/micro-$v-calib" --export "src/napari_ruac/weights/$out.pt"
