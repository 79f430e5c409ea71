#!/usr/bin/env bash
# Convert a Qwen3 base model into an I-DLM and train it with the paper's recipe (stride curriculum N = 2 -> 3 -> 4,
# DeepSpeed ZeRO-2, bf16) over any number of GPUs and nodes. Rerun the same command after a kill: the conversion is
# skipped when done, finished stages are skipped and the current one resumes from its last checkpoint.
#
# Usage: scripts/convert_qwen3_to_idlm.sh [options] [key=value ...]
#   --base M             base model, hub id or directory (default Qwen/Qwen3-8B; env BASE)
#   --recipe F           training recipe (default configs/train/qwen3_8b_idlm.yaml; env RECIPE)
#   --converted D        where the converted base goes (default checkpoints/<name>-idlm; env CONVERTED)
#   --output-dir D       training output (default: the recipe's output_dir; env OUTPUT_DIR)
#   --nproc-per-node N   ranks per node (default: every visible GPU; env NPROC_PER_NODE)
#   --nnodes N           nodes (default 1; env NNODES)
#   --node-rank R        this node's rank (default 0; env NODE_RANK)
#   --master-addr A      address of node 0 (default 127.0.0.1; env MASTER_ADDR)
#   --master-port P      port on node 0 (default: a free one, 29500 with several nodes; env MASTER_PORT)
#   --launcher L         torchrun (default) or deepspeed (env LAUNCHER; multi-node deepspeed needs HOSTFILE and
#                        is started on node 0 only)
#   --dry-run            convert if needed, then print the resolved training plan instead of training
#   key=value            recipe overrides passed to `idlm train` (e.g. num_train_epochs=0.5 stages.2.alpha=0.5)
#
# Multi-node with torchrun: run this script on every node with the same arguments and NNODES/NODE_RANK/MASTER_ADDR
# set; node 0 converts, the others wait for the converted model (the output paths must be on a shared filesystem).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BASE="${BASE:-Qwen/Qwen3-8B}"
RECIPE="${RECIPE:-$ROOT/configs/train/qwen3_8b_idlm.yaml}"
CONVERTED="${CONVERTED:-}"
OUTPUT_DIR="${OUTPUT_DIR:-}"
DRY_RUN=0
OVERRIDES=()

need() { [ $# -ge 2 ] || { echo "convert_qwen3_to_idlm.sh: $1 needs a value" >&2; exit 2; }; }
while [ $# -gt 0 ]; do
    case "$1" in
        --base) need "$@"; BASE="$2"; shift 2 ;;
        --recipe) need "$@"; RECIPE="$2"; shift 2 ;;
        --converted) need "$@"; CONVERTED="$2"; shift 2 ;;
        --output-dir) need "$@"; OUTPUT_DIR="$2"; shift 2 ;;
        --nproc-per-node) need "$@"; export NPROC_PER_NODE="$2"; shift 2 ;;
        --nnodes) need "$@"; export NNODES="$2"; shift 2 ;;
        --node-rank) need "$@"; export NODE_RANK="$2"; shift 2 ;;
        --master-addr) need "$@"; export MASTER_ADDR="$2"; shift 2 ;;
        --master-port) need "$@"; export MASTER_PORT="$2"; shift 2 ;;
        --launcher) need "$@"; export LAUNCHER="$2"; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *=*) OVERRIDES+=("$1"); shift ;;
        *) echo "convert_qwen3_to_idlm.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

if [ -n "${IDLM:-}" ]; then
    read -r -a IDLM_CMD <<< "$IDLM"
elif command -v idlm >/dev/null 2>&1; then
    IDLM_CMD=(idlm)
elif [ -x "$ROOT/.venv/bin/idlm" ]; then
    IDLM_CMD=("$ROOT/.venv/bin/idlm")
else
    echo "convert_qwen3_to_idlm.sh: no idlm command (install the project with its train extra, or set IDLM)" >&2
    exit 2
fi

if [ -z "$CONVERTED" ]; then
    CONVERTED="checkpoints/$(basename "${BASE%/}" | tr '[:upper:]' '[:lower:]')-idlm"
fi

# 1. Convert (node 0 only); `idlm convert` writes idlm_conversion.json last, so it marks a finished conversion.
if [ ! -f "$CONVERTED/idlm_conversion.json" ]; then
    if [ "${NODE_RANK:-0}" = "0" ]; then
        echo "[convert_qwen3_to_idlm] converting $BASE -> $CONVERTED" >&2
        "${IDLM_CMD[@]}" convert --base "$BASE" --output "$CONVERTED" --stride 2 --dtype bfloat16 --overwrite >&2
    else
        echo "[convert_qwen3_to_idlm] node ${NODE_RANK}: waiting for node 0 to convert $BASE" >&2
        until [ -f "$CONVERTED/idlm_conversion.json" ]; do sleep 10; done
    fi
fi

# 2. Train every stage (torchrun or the DeepSpeed launcher over NPROC_PER_NODE x NNODES ranks).
ARGS=("$RECIPE" "model_name_or_path=$CONVERTED")
[ -n "$OUTPUT_DIR" ] && ARGS+=("output_dir=$OUTPUT_DIR")
ARGS+=("${OVERRIDES[@]+"${OVERRIDES[@]}"}")
[ "$DRY_RUN" = "1" ] && ARGS+=("--dry-run")
exec "${IDLM_CMD[@]}" train "${ARGS[@]}"
