#!/usr/bin/env bash
# `idlm bench train` variants (regional torch.compile on/off, batch) on one GPU, for
# docs/results/training_throughput.md:   bash scripts/dev/train_mfu_gpu.sh      (about 10 minutes on an H100)
# Env: VARIANTS="shape:batch:flags ..." (flags joined by ','), OUT (results: bench_train_*.json, a summary last).
set -uo pipefail
cd "$(dirname "$0")/../.."
export OUT=${OUT:-$PWD/outputs/train_mfu}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/pip_install.log" 2>&1 || tail -5 "$OUT/pip_install.log"
VARIANTS=${VARIANTS:-"qwen3-1.7b:2:--compile qwen3-1.7b:2: qwen3-0.6b:1:--compile qwen3-1.7b:1:--compile qwen3-1.7b:3:--compile"}
for v in $VARIANTS; do
  IFS=: read -r shape batch flags <<<"$v"
  name="bench_train_${shape}_b${batch}${flags//[-,]/}"
  timeout ${PER_RUN_S:-170} idlm bench train --shape "$shape" --seq-len 4096 --batch-size "$batch" --stride 4 \
    --attn flex_attention --steps 5 --json ${flags//,/ } > "$OUT/$name.json" 2> "$OUT/$name.log" \
    || echo "$name failed: $(tail -2 "$OUT/$name.log")"
done
python3 - <<'PY'
import glob, json, os
for f in sorted(glob.glob(os.environ["OUT"] + "/bench_train_*.json")):
    try:
        d = json.load(open(f))
    except Exception:
        continue
    r = {x["mode"]: x for x in d["results"]}
    o, a = r["objective"], r["ar"]
    print(f"{os.path.basename(f)}: compile={d.get('compile')} obj {o['step_s']:.3f}s MFU {100*o['mfu']:.1f}% "
          f"mem {o['peak_memory_gb']:.1f}GB | AR {a['step_s']:.3f}s MFU {100*a['mfu']:.1f}% | "
          f"ratio {d['objective_step_over_ar_step']:.2f}")
PY
