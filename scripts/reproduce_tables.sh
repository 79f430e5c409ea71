#!/usr/bin/env bash
# Reproduce the paper's tables for one model: serve it, run the quality suite (14 benchmarks, thinking mode,
# the paper's sampling), run the throughput sweep when `idlm bench throughput` exists, and write the tables.
#
#   scripts/reproduce_tables.sh MODEL_DIR [OUT_DIR]          (OUT_DIR default: outputs/reproduce/<model name>)
#
# Rerunning the same command resumes: finished samples are kept, failed ones are retried.
#
# Environment (all optional):
#   ENGINE=native|sglang   server to start (native = the reference ISD engine, `idlm serve`; default native)
#   BASE_URL=URL           use an already running OpenAI-compatible server instead of starting one
#   PORT=N                 port for the server (native default 0 = a free one, read from its log; sglang 30000)
#   STRIDE=N               ISD stride for the native server (default: the checkpoint's)
#   SERVE_ARGS="..."       extra arguments for the server command
#   SUITE=paper15          benchmarks (a suite name, comma-separated names, or a suite YAML)
#   LIMIT=K SAMPLES=K      only the first K items / K samples per item (smoke runs; not comparable to the paper)
#   CONCURRENCY=32         requests in flight during the quality runs
#   MAX_TOKENS=N           max new tokens (default: the paper's 32768)
#   DATA_DIR=data          benchmark data; DATA_FROM=DIR copies it from a local directory first (idlm data fetch)
#   EVAL_ARGS="..."        extra arguments for `idlm eval`
#   SKIP_MISSING=1         benchmarks without data are reported and skipped (0: stop instead)
#   THROUGHPUT=auto|0      run the throughput sweep if available (default auto); THROUGHPUT_ARGS="..." extra args
#   SERVER_WAIT=1800       seconds to wait for the server to become healthy
#   IDLM=path/to/idlm      the CLI (default: .venv/bin/idlm, else `idlm` on PATH)
set -euo pipefail

usage() { sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; }
[ $# -ge 1 ] || { usage >&2; exit 2; }
case "$1" in -h|--help) usage; exit 0 ;; esac

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODEL="$1"
NAME="$(basename "${MODEL%/}")"
OUT="${2:-outputs/reproduce/$NAME}"
ENGINE="${ENGINE:-native}"
SUITE="${SUITE:-paper15}"
CONCURRENCY="${CONCURRENCY:-32}"
DATA_DIR="${DATA_DIR:-data}"
THROUGHPUT="${THROUGHPUT:-auto}"
SERVER_WAIT="${SERVER_WAIT:-1800}"
if [ -z "${IDLM:-}" ]; then
    if [ -x "$ROOT/.venv/bin/idlm" ]; then IDLM="$ROOT/.venv/bin/idlm"; else IDLM="idlm"; fi
fi
mkdir -p "$OUT"
LOG="$OUT/server.log"
SERVER_PID=""

log() { echo "[reproduce] $*" >&2; }

http_ok() {  # URL -> success when it answers 2xx within 5 s (curl, else python3)
    if command -v curl >/dev/null 2>&1; then
        curl -fsS -m 5 "$1" >/dev/null 2>&1
    else
        python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' "$1" >/dev/null 2>&1
    fi
}

cleanup() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        log "stopping the server (pid $SERVER_PID)"
        kill "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$SERVER_PID" 2>/dev/null || true
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start_native() {
    local port="${PORT:-0}"
    # shellcheck disable=SC2086
    "$IDLM" serve --model "$MODEL" --host 127.0.0.1 --port "$port" ${STRIDE:+--stride "$STRIDE"} \
        --served-model-name "$NAME" ${SERVE_ARGS:-} >"$LOG" 2>&1 &
    SERVER_PID=$!
    if [ "$port" = "0" ]; then
        BASE_URL=""
        for _ in $(seq 1 "$SERVER_WAIT"); do
            BASE_URL="$(grep -o 'ready at http://[^ ]*' "$LOG" 2>/dev/null | head -n1 | sed 's/^ready at //')" || true
            [ -n "$BASE_URL" ] && break
            kill -0 "$SERVER_PID" 2>/dev/null || { log "the server exited:"; tail -n 20 "$LOG" >&2; exit 1; }
            sleep 1
        done
        [ -n "$BASE_URL" ] || { log "the server did not report its address in ${SERVER_WAIT}s"; exit 1; }
    else
        BASE_URL="http://127.0.0.1:$port/v1"
    fi
}

# ---- SGLang --------------------------------------------------------------------------------------------------
# `idlm serve --engine sglang` (SGLang with the ISD worker, docs/serving.md); SGLANG_CMD may replace it with a full
# command line (e.g. the paper's `python -m sglang.launch_server --model-path M --dllm-algorithm IDLMBlockN
# --dllm-algorithm-config configs/inference/idlm_blockN4.yaml --port 30000 ...`).
start_sglang() {
    local port="${PORT:-30000}"
    if [ -n "${SGLANG_CMD:-}" ]; then
        bash -c "$SGLANG_CMD" >"$LOG" 2>&1 &
    else
        # shellcheck disable=SC2086
        "$IDLM" serve --engine sglang --model "$MODEL" --host 127.0.0.1 --port "$port" \
            ${STRIDE:+--stride "$STRIDE"} >"$LOG" 2>&1 &
    fi
    SERVER_PID=$!
    BASE_URL="http://127.0.0.1:$port/v1"
}
# -------------------------------------------------------------------------------------------------------------

wait_healthy() {
    local root="${BASE_URL%/v1}" i
    for i in $(seq 1 "$SERVER_WAIT"); do
        if http_ok "$root/health" || http_ok "$BASE_URL/models"; then
            log "server ready at $BASE_URL"
            return 0
        fi
        if [ -n "$SERVER_PID" ] && ! kill -0 "$SERVER_PID" 2>/dev/null; then
            log "the server exited:"; tail -n 20 "$LOG" >&2; exit 1
        fi
        sleep 1
    done
    log "the server at $BASE_URL was not healthy after ${SERVER_WAIT}s"; exit 1
}

if [ -n "${BASE_URL:-}" ]; then
    log "using the running server at $BASE_URL"
else
    case "$ENGINE" in
        native) start_native ;;
        sglang) start_sglang ;;
        *) log "unknown ENGINE=$ENGINE (native or sglang)"; exit 2 ;;
    esac
fi
wait_healthy

if [ -n "${DATA_FROM:-}" ]; then
    "$IDLM" data fetch --dir "$DATA_DIR" --from "$DATA_FROM" || log "some data files could not be copied (see above)"
fi

log "quality suite $SUITE -> $OUT/eval"
# shellcheck disable=SC2086
"$IDLM" eval --base-url "$BASE_URL" --suite "$SUITE" --output "$OUT/eval" --data-dir "$DATA_DIR" \
    --concurrency "$CONCURRENCY" ${LIMIT:+--limit "$LIMIT"} ${SAMPLES:+--samples "$SAMPLES"} \
    ${MAX_TOKENS:+--max-tokens "$MAX_TOKENS"} $([ "${SKIP_MISSING:-1}" = "1" ] && echo --skip-missing) ${EVAL_ARGS:-}

TABLE_INPUTS=("$OUT/eval")
if [ "$THROUGHPUT" != "0" ]; then
    if "$IDLM" bench throughput --help >/dev/null 2>&1; then
        log "throughput sweep -> $OUT/throughput"
        # shellcheck disable=SC2086
        "$IDLM" bench throughput --base-url "$BASE_URL" --output "$OUT/throughput" ${THROUGHPUT_ARGS:-}
        TABLE_INPUTS+=("$OUT/throughput")
    else
        log "\`idlm bench throughput\` is not available; skipping the throughput table"
    fi
fi

"$IDLM" tables "${TABLE_INPUTS[@]}" --output "$OUT/tables"
log "tables in $OUT/tables"
