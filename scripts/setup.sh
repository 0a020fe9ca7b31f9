#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment in .venv, idempotently.
#
# Pinned versions come from requirements/constraints.txt (the set known to install on our
# 2-core CPU machines: torch 2.14.1, torchvision 0.29.1, sam2 1.1.0, napari 0.9.2 + PyQt6, ...).
# On Debian as root it also installs Xvfb and the X/GL libraries napari's tests need.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
CONSTRAINTS=requirements/constraints.txt
STAMP=.venv/.setup-stamp
want=$(cat "$CONSTRAINTS" pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)

install_system_packages() {
  local pkgs="xvfb xauth libxcb-icccm4 libxcb-keysyms1 libxcb-image0 libxcb-render-util0 libxcb-xinerama0 libxcb-xkb1 libxkbcommon-x11-0 libxcb-cursor0 libgl1 libegl1 libfontconfig1 libdbus-1-3"
  if command -v Xvfb >/dev/null 2>&1 && dpkg -s libxcb-cursor0 >/dev/null 2>&1; then return; fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing Xvfb and X libraries (apt-get)"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $pkgs >/dev/null
  else
    echo "setup: warning: Xvfb missing and not root; napari tests need: apt-get install $pkgs" >&2
  fi
}

install_system_packages
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && .venv/bin/python -c "import napari_ruac" 2>/dev/null; then
  echo "setup: .venv is up to date"
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install -U pip setuptools wheel 2>&1 | grep -v "is ignored" || true
# torch first (a plain `torch` requirement would pull a multi-GB CUDA download elsewhere)
"${PIP[@]}" install -c "$CONSTRAINTS" torch torchvision 2>&1 | grep -v "is ignored" || true
# sam2's PyPI release is an sdist: build without isolation so it uses the torch above
SAM2_BUILD_CUDA=0 "${PIP[@]}" install --no-build-isolation -c "$CONSTRAINTS" sam2 2>&1 | grep -v "is ignored" || true
"${PIP[@]}" install -c "$CONSTRAINTS" -e ".[napari,test]" 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import torch, sam2, napari, napari_ruac; print('setup: ok, torch', torch.__version__)"
echo "$want" > "$STAMP"
