#!/usr/bin/env bash
# Set up, then run the test suite (napari tests run under Xvfb through pytest-xvfb).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
