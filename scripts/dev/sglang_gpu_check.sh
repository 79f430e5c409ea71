#!/usr/bin/env bash
# GPU check of ISD under SGLang 0.5.15, for ONE device call of at most 10 minutes on an H100 (the lead runs it):
#   run(command="bash scripts/dev/sglang_gpu_check.sh", carry=[".device"], timeout_s=600)
# with the offline bundle copied to .device/sglang-0.5.15-bundle.tar.xz. What it does (scripts/dev/sglang_gpu_check.py):
#   1. small random Qwen3-shaped I-DLM on disk: SGLang ISD N=4 (paper spelling --dllm-algorithm IDLMBlockN) vs the
#      reference engine vs SGLang AR, greedy, 50 prompts; sampled requests; a bad request and a disconnect;
#   2. Qwen3-8B-shaped dummy weights: ISD N=4 vs SGLang AR step time at C=1,8,32,64 -> $OUT/docs/results/.
# Env: PHASES=1,2 (default), BUDGET_S=560 (phase 2 is skipped when too little is left), OUT (default outputs/...),
# IDLM_ISD_VERIFY_ATTENTION=splitkv|gqa|prefill (the ISD servers inherit it: exactness and speed of that kernel).
# Output: $OUT/sglang_gpu_check.json, $OUT/logs/*.log (server logs), $OUT/docs/results/serving_h100.{json,md};
# a summary block is printed last; exit code 1 on any failed check.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OUT=${OUT:-$PWD/outputs/sglang_gpu_check}
mkdir -p "$OUT"
say() { echo "[sglang_gpu_check.sh] $*"; }
bundle=.device/sglang-0.5.15-bundle.tar.xz
[ -f "$bundle" ] || { say "FAIL: $bundle is missing (copy ../shared/device/sglang-0.5.15-bundle.tar.xz there and carry .device)"; exit 1; }
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv || true
t0=$(date +%s)
mkdir -p /tmp/site && tar -C /tmp/site -xJf "$bundle"
export PYTHONPATH=/tmp/site:$PWD
say "bundle unpacked in $(( $(date +%s) - t0 )) s"
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/pip_install.log" 2>&1 \
  || { say "FAIL: pip install -e . (see $OUT/pip_install.log)"; tail -20 "$OUT/pip_install.log"; exit 1; }
python3 - <<'PY' || { say "FAIL: environment check (above)"; exit 1; }
import importlib.metadata as md, sys, torch
eps = [e for e in md.entry_points(group="sglang.srt.plugins") if e.name == "idlm_isd"]
assert eps, "the idlm_isd entry point (group sglang.srt.plugins) is not visible: is idlm installed (pip install -e .)?"
assert torch.cuda.is_available(), "CUDA is not available"
import sglang, transformers
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, sglang {md.version('sglang')}, "
      f"transformers {transformers.__version__}, entry point {eps[0].value}")
from idlm.inference.sglang_isd.plugin import register
register()
from sglang.srt.speculative.spec_info import SpeculativeAlgorithm
assert SpeculativeAlgorithm.from_string("ISD").name == "ISD"
print("plugin registers ISD: ok")
PY
export BUDGET_S=${BUDGET_S:-$(( 570 - ($(date +%s) - t0) ))}
exec python3 scripts/dev/sglang_gpu_check.py --out "$OUT"
