#!/usr/bin/env bash
# Start SGLang with ISD on an I-DLM checkpoint (OpenAI-compatible API on HOST:PORT).
#   scripts/launch_server.sh CKPT [STRIDE] [extra sglang.launch_server flags ...]
# Environment: HOST (127.0.0.1), PORT (30000), PYTHON (python3). Same as `idlm serve --engine sglang`; the paper's
# spelling also works once idlm is installed (its SGLang plugin translates it):
#   python -m sglang.launch_server --model-path CKPT --dllm-algorithm IDLMBlockN \
#       --dllm-algorithm-config configs/inference/idlm_blockN4.yaml
set -euo pipefail
if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  sed -n '2,8p' "$0"; exit 2
fi
model=$1; shift
stride_args=()
if [ $# -gt 0 ] && [[ $1 =~ ^[0-9]+$ ]]; then stride_args=(--stride "$1"); shift; fi
py=${PYTHON:-python3}
cmd=$("$py" -m idlm serve --engine sglang --model "$model" "${stride_args[@]}" --host "${HOST:-127.0.0.1}" \
      --port "${PORT:-30000}" --print-command --sglang-args "$*")
echo "+ $cmd" >&2
eval "exec env $cmd"
