#!/usr/bin/env bash
# GPU check of ISD under SGLang 0.5.15 on one GPU, about 10 minutes on an H100. From the repository root:
#   pip install -e '.[serve]'                  # sglang==0.5.15 and the idlm plugin entry point
#   bash scripts/dev/sglang_gpu_check.sh
# On a machine without a package index, give SGLang 0.5.15 and its dependencies as a site-packages folder instead
# (made elsewhere with `pip install --target DIR sglang==0.5.15 ...`): SGLANG_SITE=DIR goes first on PYTHONPATH, or
# SGLANG_BUNDLE=FILE.tar.xz (that folder packed) is unpacked into a temporary folder first.
# What it does (scripts/dev/sglang_gpu_check.py):
#   1. small Qwen3-shaped I-DLM trained briefly on a synthetic language: SGLang ISD N=4 (paper spelling
#      --dllm-algorithm IDLMBlockN) vs the reference engine vs SGLang AR, greedy, 50 prompts; R-ISD vs AR; sampled
#      requests; a bad request and a disconnect;
#   2. Qwen3-8B-shaped dummy weights: ISD N=4 vs SGLang AR step time at C=1,8,32,64 -> $OUT/docs/results/.
# Env: IDLM_SGLANG_ATTENTION=triton|flashinfer (every server's attention backend, default triton),
# IDLM_SGLANG_BACKENDS=flashinfer,triton (phase 2: an ISD and an AR 8B server per backend, all started at once and
# timed in one run; $OUT/docs/results/serving_backends.{json,md}: ISD against the faster AR at each C; e.g.
# IDLM_SGLANG_ATTENTION=flashinfer IDLM_SGLANG_BACKENDS=triton BENCH_SAMPLED=1.0,0.95,50 PHASES=2 BUDGET_S=560),
# IDLM_SGLANG_MEM_FRACTION (each server's --mem-fraction-static, default 0.8; lower it when other work shares the GPU),
# PHASES=1,2 (default), BUDGET_S (seconds for the whole check, default 570; phase 2 is skipped when too little is left),
# OUT (default outputs/sglang_gpu_check), BENCH_SAMPLED=T,P,K (also time sampled requests), LEVELS=1,8,32,64,
# IDLM_ISD_VERIFY_ATTENTION=splitkv|gqa|prefill (the ISD servers inherit it: exactness and speed of that kernel).
# Output: $OUT/sglang_gpu_check.json, $OUT/logs/*.log (server logs), $OUT/docs/results/serving_h100.{json,md};
# a summary block is printed last; exit code 1 on any failed check.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OUT=${OUT:-$PWD/outputs/sglang_gpu_check}
mkdir -p "$OUT"
say() { echo "[sglang_gpu_check.sh] $*"; }
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv || true
t0=$(date +%s)
unpacked=""
trap '[ -z "$unpacked" ] || rm -rf "$unpacked"' EXIT
if [ -n "${SGLANG_BUNDLE:-}" ]; then
    [ -f "$SGLANG_BUNDLE" ] || { say "FAIL: SGLANG_BUNDLE=$SGLANG_BUNDLE does not exist"; exit 1; }
    if [ -z "${SGLANG_SITE:-}" ]; then SGLANG_SITE=$(mktemp -d); unpacked=$SGLANG_SITE; fi
    tar -C "$SGLANG_SITE" -xJf "$SGLANG_BUNDLE"
    say "$SGLANG_BUNDLE unpacked into $SGLANG_SITE in $(( $(date +%s) - t0 )) s"
fi
if [ -n "${SGLANG_SITE:-}" ]; then
    export PYTHONPATH="$SGLANG_SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('sglang') is None)" \
  || { say "FAIL: sglang is not importable: pip install -e '.[serve]', or set SGLANG_SITE / SGLANG_BUNDLE"; exit 1; }
# the plugin entry point (group sglang.srt.plugins) must be visible to SGLang's processes
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
python3 scripts/dev/sglang_gpu_check.py --out "$OUT"
