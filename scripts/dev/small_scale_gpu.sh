#!/usr/bin/env bash
# Runs scripts/small_scale.py on a GPU machine that reaches no registry, in device calls that each carry part of
# the 98 MB SmolLM2 GGUF (a call carries at most 64 MiB). Everything lives in /tmp/ss, which outlives a call while
# the machine stays warm; the pipeline runs detached (setsid) so that it outlives one call's 10-minute limit.
#   setup          (carry .dev1: gguf.part1, GSM8K train/test JSONL, whl/gguf-*.whl)  install, stash part 1
#   launch SECS    (carry .dev2: gguf.part2, gguf.sha256)  join + verify, start the pipeline, wait up to SECS
#   wait SECS      wait up to SECS more; every call copies results, plot and logs to $OUT
set -uo pipefail
S=/tmp/ss
collect() {
  grep -a "small_scale \|Error\|error" $S/log | grep -v Warning | tail -60
  mkdir -p "$OUT"
  cp $S/out/results.json $S/out/small_scale.png "$OUT"/ 2>/dev/null
  cp $S/log "$OUT"/pipeline.log 2>/dev/null
  tar -C $S/out -czf "$OUT"/train_logs.tgz $(cd $S/out && ls *.jsonl 2>/dev/null | grep -v distill) 2>/dev/null
  head -c 2000000 $S/out/distill.jsonl > "$OUT"/distill_head.jsonl 2>/dev/null
}
wait_for() {
  local end=$(( $(date +%s) + $1 ))
  while [ "$(date +%s)" -lt $end ]; do
    if grep -aq "plots done\|Traceback" $S/log 2>/dev/null; then break; fi
    sleep 5
  done
  collect
}
case "$1" in
  setup)
    mkdir -p $S && cp .dev1/gguf.part1 .dev1/*.jsonl .dev1/whl/*.whl $S/ &&
    python3 -m pip install -q --no-index --no-deps $S/gguf-*.whl &&
    python3 -m pip install -q --no-deps --no-build-isolation -e . && nvidia-smi --query-gpu=name,memory.total --format=csv ;;
  launch)
    cat $S/gguf.part1 .dev2/gguf.part2 > $S/model.gguf &&
    [ "$(sha256sum $S/model.gguf | cut -d' ' -f1)" = "$(cat .dev2/gguf.sha256)" ] || { echo "GGUF checksum mismatch"; exit 1; }
    cd "$(dirname "$0")/../.." && PYTHONUNBUFFERED=1 setsid nohup python3 scripts/small_scale.py all --out $S/out \
      --set base.gguf=$S/model.gguf --set data.train_prompts=$S/train.jsonl --set data.test_prompts=$S/test.jsonl \
      > $S/log 2>&1 < /dev/null &
    wait_for "$2" ;;
  wait) wait_for "$2" ;;
esac
