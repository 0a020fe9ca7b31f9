#!/usr/bin/env bash
# Evaluate the three shipped variants (or the given models) on every real target and print the
# README's result tables:
#   bash scripts/evaluate_targets.sh [MODEL ...]        # default: micro micro-bayes micro-det
# Fetches the targets first (scripts/fetch_targets.py, cache outside git); results go to
# results/eval/<target>[_zoomZ]-<model>.json (+ per-object CSV). One torch thread by default, so
# it can run beside a training run on a 2-core machine; EVAL_THREADS=2 on a quiet one.
# EVAL_REUSE=1 keeps the results already in results/eval that are newer than their model (to go
# on after an interruption).
set -euo pipefail
cd "$(dirname "$0")/.."
models=("$@")
[ ${#models[@]} -gt 0 ] || models=(micro micro-bayes micro-det)
cache=$(.venv/bin/python scripts/fetch_targets.py | tail -1 | sed -E 's#^[^:]+: (.*)/[^/]+$#\1#')
out=results/eval
mkdir -p "$out"
fresh() {  # json, model: EVAL_REUSE=1 and the json is newer than the model's weights file
  [ "${EVAL_REUSE:-0}" = 1 ] && [ -f "$1" ] || return 1
  local w=$2
  [ -f "$w" ] || w=src/napari_ruac/weights/$2.pt
  [ ! -f "$w" ] || [ "$1" -nt "$w" ]
}
run() {  # target, tag, extra args...
  local target=$1 tag=$2; shift 2
  for m in "${models[@]}"; do
    name=$(basename "$m" .pt)
    fresh "$out/$tag-$name.json" "$m" && continue
    OMP_NUM_THREADS=${EVAL_THREADS:-1} .venv/bin/napari-ruac evaluate --images "$cache/$target/images" --masks "$cache/$target/masks" \
      --model "$m" --json "$out/$tag-$name.json" "$@" > /dev/null
  done
  echo "**$tag**"
  echo
  .venv/bin/python scripts/results_table.py $(for m in "${models[@]}"; do echo "$out/$tag-$(basename "$m" .pt).json"; done)
  echo
}
all=point1,point3,box,automatic  # automatic: automatic segmentation, matched to the truth
run dsb2018 dsb2018 --prompts point1,point2,point3,box,automatic  # point2: the first correction alone
# the model's own values beyond a tight box (not cut at it: --box-margin off)
run dsb2018 dsb2018_boxoff --prompts box --box-margin off --no-baselines
run nuclei3d nuclei3d --prompts $all
run nuclei3d nuclei3d_zoom0.5 --zoom 0.5 --prompts $all
run stardist3d stardist3d --prompts $all
run stardist3d stardist3d_zoom2 --zoom 2 --prompts $all
# each plane at its own zoom from the size of its objects (--zoom auto): clicks and automatic
# segmentation (boxes set their own zoom, so their rows would not change)
auto=point1,point3,automatic
run dsb2018 dsb2018_zoomauto --zoom auto --prompts $auto --no-baselines
run nuclei3d nuclei3d_zoomauto --zoom auto --prompts $auto --no-baselines
run stardist3d stardist3d_zoomauto --zoom auto --prompts $auto --no-baselines
# each prompt also decoded a quarter octave below and above its zoom, probabilities averaged
# (--scales 3; with each plane at its own zoom on the 3D targets)
three=point1,point3,box
run dsb2018 dsb2018_scales3 --scales 3 --prompts $three,automatic --no-baselines
run nuclei3d nuclei3d_zoomauto_scales3 --zoom auto --scales 3 --prompts $three --no-baselines
run stardist3d stardist3d_zoomauto_scales3 --zoom auto --scales 3 --prompts $three --no-baselines
# one click on DSB2018 over five draws of the clicks (--seed 0-4), at one and three scales, and two corrections at one: on
# one image which pixel is clicked moves mIoU by ~0.01, so a target that close is judged on the
# spread (scripts/seed_spread.py)
draws() {  # target, file tag, prompts, extra args...: every model at --seed 0-4, files added to $spread
  local target=$1 tag=$2 prompts=$3; shift 3
  for m in "${models[@]}"; do
    name=$(basename "$m" .pt)
    for seed in 0 1 2 3 4; do
      json=$out/${target}_seed${seed}${tag}-$name.json
      spread+=("$json")
      fresh "$json" "$m" && continue
      OMP_NUM_THREADS=${EVAL_THREADS:-1} .venv/bin/napari-ruac evaluate --images "$cache/$target/images" \
        --masks "$cache/$target/masks" --model "$m" --json "$json" --prompts $prompts --seed $seed \
        --no-baselines "$@" > /dev/null
    done
  done
}
spread=()
draws dsb2018 _scales1 point1,point3 --scales 1
draws dsb2018 _scales3 point1 --scales 3  # corrections at three scales: ~5 min a run on one core
echo "**dsb2018, one click (and corrections at one scale) over five draws**"
echo
.venv/bin/python scripts/seed_spread.py "${spread[@]}"
# the same for the confocal stack at zoom 1 (590 nuclei: the draws move it less)
spread=()
draws nuclei3d "" point1,point3
echo "**nuclei3d, one click and corrections over five draws**"
echo
.venv/bin/python scripts/seed_spread.py "${spread[@]}"
