#!/usr/bin/env bash
# Smoke-test a vLLM install on this host: start `vllm serve` on 127.0.0.1 and a free
# port, wait for /v1/models, send one completion, print it, and stop the server.
#
# Usage: scripts/vllm_smoke.sh [VENV [MODEL_DIR [EXTRA_SERVE_FLAGS...]]]
#   VENV       the venv from scripts/install_vllm.sh
#              (default ${ORCHESTRATOR_VLLM_VENV:-$HOME/.cache/orchestrator-vllm-venv})
#   MODEL_DIR  a model directory, e.g. from scripts/build_tiny_model.py (default, or
#              "": build the tiny model in ${TMPDIR:-/tmp}/orchestrator-tiny-model)
#   EXTRA_SERVE_FLAGS  passed on to `vllm serve`, e.g. --enforce-eager
#
# Environment: VLLM_SMOKE_TIMEOUT  seconds to wait for the server (default 300)
#              VLLM_SMOKE_PORT     port (default: a free one)
#              VLLM_CPU_KVCACHE_SPACE  KV cache GiB (default 1)
# Exit status 0 when the completion came back.
set -euo pipefail

ROOT="$(cd "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-${ORCHESTRATOR_VLLM_VENV:-$HOME/.cache/orchestrator-vllm-venv}}"
MODEL="${2:-}"
shift $(($# > 2 ? 2 : $#))
TIMEOUT="${VLLM_SMOKE_TIMEOUT:-300}"
PY="$VENV/bin/python"

log() { echo "vllm_smoke: $*" >&2; }

[[ -x "$VENV/bin/vllm" ]] || { log "no $VENV/bin/vllm; run scripts/install_vllm.sh"; exit 1; }
if [[ -z "$MODEL" ]]; then
  MODEL="$("$PY" "$ROOT/scripts/build_tiny_model.py" "${TMPDIR:-/tmp}/orchestrator-tiny-model")"
fi
[[ -f "$MODEL/config.json" ]] || { log "no $MODEL/config.json"; exit 1; }

free_port() {
  "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
PORT="${VLLM_SMOKE_PORT:-$(free_port)}"
URL="http://127.0.0.1:$PORT"
LOG="$(mktemp "${TMPDIR:-/tmp}/vllm_smoke.XXXXXX.log")"
PID=""

stop() {
  local rc=$?
  if [[ -n "$PID" ]] && kill -0 "$PID" 2>/dev/null; then
    log "stopping the server (process group $PID)"
    kill -TERM -- "-$PID" 2>/dev/null || true
    for _ in $(seq 1 30); do
      kill -0 "$PID" 2>/dev/null || break
      sleep 0.5
    done
    kill -KILL -- "-$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
  fi
  if [[ $rc -ne 0 ]]; then
    log "failed; the last lines of $LOG:"
    tail -n 40 -- "$LOG" >&2 || true
  else
    rm -f -- "$LOG"
  fi
  exit "$rc"
}
trap stop EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log "starting vllm serve $MODEL on $URL (log: $LOG)"
start=$SECONDS
# setsid: the server and its engine/worker processes form one process group, so
# stop() can end them all together.
HF_HUB_OFFLINE=1 VLLM_HOST_IP=127.0.0.1 VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}" \
  setsid "$VENV/bin/vllm" serve "$MODEL" --host 127.0.0.1 --port "$PORT" \
  --max-model-len 4096 --dtype bfloat16 --no-enable-chunked-prefill "$@" \
  >"$LOG" 2>&1 </dev/null &
PID=$!

until curl -sf --max-time 5 "$URL/v1/models" >/dev/null 2>&1; do
  kill -0 "$PID" 2>/dev/null || { log "the server exited before it was ready"; exit 1; }
  if ((SECONDS - start >= TIMEOUT)); then
    log "not ready after ${TIMEOUT}s"
    exit 1
  fi
  sleep 1
done
log "ready after $((SECONDS - start))s"

NAME="$(curl -sf --max-time 10 "$URL/v1/models" |
  "$PY" -c 'import json, sys; print(json.load(sys.stdin)["data"][0]["id"])')"
BODY="$("$PY" -c '
import json, sys
print(json.dumps({"model": sys.argv[1], "prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}))
' "$NAME")"
REPLY="$(curl -sf --max-time 120 -H 'Content-Type: application/json' -d "$BODY" "$URL/v1/completions")"
echo "$REPLY" | "$PY" -c '
import json, sys
reply = json.load(sys.stdin)
print("completion:", json.dumps(reply["choices"][0]["text"]))
print("usage:", json.dumps(reply["usage"]))
'
log "ok"
