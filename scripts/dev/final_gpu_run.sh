#!/usr/bin/env bash
# The GPU runs behind docs/results/serving_h100.md and training_throughput.md, in one go (<= 10 minutes on an H100):
# the verify-attention kernel's GPU cases, the SGLang ISD check (ISD and R-ISD exactness, serving speed:
# scripts/dev/sglang_gpu_check.sh, which says how SGLang must be installed) and the training-throughput bench of the
# objective vs plain SFT (`idlm bench train`, eager; the --compile variants are scripts/dev/train_mfu_gpu.sh).
# From the repository root, with SGLang 0.5.15 importable (pip install -e '.[serve]', or SGLANG_SITE / SGLANG_BUNDLE):
#   bash scripts/dev/final_gpu_run.sh
#   SKIP_TRAIN=1 bash scripts/dev/final_gpu_run.sh       # serving only
# Env: SKIP_TRAIN=1, IDLM_ISD_VERIFY_ATTENTION=splitkv|prefill (default: the GQA-packed kernel), IDLM_ISD_OVERLAP=0
# (ISD servers started with --disable-overlap-schedule), and sglang_gpu_check.sh's PHASES / BUDGET_S / BENCH_SAMPLED.
# Results under $OUT (default outputs/final_gpu_run): sglang_gpu_check.json, docs/results/serving_h100.{json,md},
# logs/, bench_train_*.json.
set -uo pipefail
cd "$(dirname "$0")/../.."
export OUT=${OUT:-$PWD/outputs/final_gpu_run}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "pip install -e . failed"
# the GQA-packed verify attention kernel, compiled (its CPU test runs it in Triton's interpreter)
timeout 90 python3 -m tests.verify_attention_cases cuda 2>&1 | tail -12
BUDGET_S=${BUDGET_S:-400} timeout 450 bash scripts/dev/sglang_gpu_check.sh 2>&1 \
  | grep -v "Capturing\|Ignore import error\|SyntaxWarning\|Configuration class\|near-tie)" | tail -60
rm -rf "$OUT/work"
[ -n "${SKIP_TRAIN:-}" ] && exit 0  # serving only
for spec in "qwen3-0.6b 1" "qwen3-1.7b 1" "qwen3-1.7b 2"; do
  set -- $spec
  timeout 60 idlm bench train --shape "$1" --seq-len 4096 --batch-size "$2" --stride 4 --attn flex_attention \
    --steps 5 --json > "$OUT/bench_train_$1_b$2.json" 2> "$OUT/bench_train_$1_b$2.log" \
    || echo "bench train $1 b$2 failed: $(tail -3 "$OUT/bench_train_$1_b$2.log")"
done
python3 - <<'PY'
import glob, json, os
for f in sorted(glob.glob(os.environ["OUT"] + "/bench_train_*.json")):
    try:
        d = json.load(open(f))
    except Exception as e:
        print(f, "unreadable", e); continue
    print(os.path.basename(f), json.dumps(d)[:600])
PY
