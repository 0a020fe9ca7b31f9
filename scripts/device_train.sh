#!/usr/bin/env bash
# Train recipes on a lent GPU machine (the workplace's `device` tool; see training/README.md,
# "On a lent GPU"). That machine has Python 3.12 with torch, torchvision, torch-geometric,
# tifffile, scikit-image, scipy and pyyaml, but not sam2 and its small pure-Python dependencies,
# and it cannot download anything. So:
#
#   here, once:      bash scripts/device_train.sh --prepare
#                    (builds those wheels into .whl/, which git ignores through .git/info/exclude)
#   on the device:   run(command="bash scripts/device_train.sh 8 training/micro-ruac.yaml ...",
#                        carry=[".whl"], timeout_s=600)
#
# MINUTES bounds each run's wall time: the runs train side by side and are stopped with SIGTERM,
# which checkpoints the step they reached; each exports its packaged fp16 model, log and curves
# into $OUT (what comes back), and its resume state split into parts under 16 MiB (the limit per
# returned file) -- `cat NAME.state.part-* > runs/NAME/last.pt` here, then resume on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    rm -rf .whl && mkdir -p .whl
    py=.venv/bin/python
    [ -x "$py" ] || { echo "run scripts/setup.sh first (sam2's wheel is built against its torch)" >&2; exit 1; }
    # the versions scripts/setup.sh installs here; all build to py3-none-any wheels
    SAM2_BUILD_CUDA=0 "$py" -m pip wheel -q --no-deps --no-build-isolation -w .whl sam2==1.1.0
    "$py" -m pip wheel -q --no-deps -w .whl hydra-core==1.3.8 omegaconf==2.3.1 \
        antlr4-python3-runtime==4.9.3 iopath==0.1.10
    ls -l .whl
    exit 0
fi

if [ $# -lt 2 ]; then
    echo "usage: $0 --prepare | MINUTES RECIPE.yaml [RECIPE.yaml ...]" >&2
    exit 2
fi
minutes=$1
shift
ls .whl/*.whl > /dev/null 2>&1 || { echo "no wheels in .whl/: run '$0 --prepare' here and carry .whl" >&2; exit 1; }
py=${PYTHON:-python3}  # PYTHON and DEVICE let the flow be tried on a CPU machine
device=${DEVICE:-cuda}
"$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
out=${OUT:-runs/device-out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

workers=$(( $(nproc) / $# ))
[ "$workers" -ge 1 ] || workers=1
for recipe in "$@"; do
    name=$(basename "$recipe" .yaml)
    # --foreground: SIGTERM reaches the trainer itself, which then checkpoints and exports
    timeout --foreground -s TERM "$((minutes * 60))" \
        "$py" -m napari_ruac.cli train "$recipe" --run-dir "runs/$name" --device "$device" \
        --workers "$workers" --output "$out/$name.pt" > "$out/$name.log" 2>&1 &
done
status=0
wait || status=$?
for recipe in "$@"; do
    name=$(basename "$recipe" .yaml)
    tail -3 "$out/$name.log" || true
    [ -f "runs/$name/log.csv" ] && cp "runs/$name/log.csv" "$out/$name.log.csv"
    [ -f "runs/$name/last.pt" ] && split -b 15M -d "runs/$name/last.pt" "$out/$name.state.part-"
done
ls -l "$out"
exit "$status"
