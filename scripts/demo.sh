#!/usr/bin/env bash
# Quick start: set up, then segment a nucleus of the bundled DSB2018 sample with one click and
# write its mask and per-pixel uncertainty as TIFFs into results/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/napari-ruac predict sample_data/nuclei2d.tif --point 39,62 -o results "$@"
