#!/usr/bin/env bash
# The README's main-job command: set up .venv/ and run the end-to-end demo on CPU, offline (about 10 minutes):
# convert SmolLM2-135M-Instruct to an I-DLM, train briefly, decode with ISD at N = 2 and 4.
# Extra arguments go to scripts/demo.py (e.g. --steps 40).
set -euo pipefail
source "$(dirname "$0")/env/venv.sh"
ensure_venv demo
cd "$IDLM_ROOT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
exec "$VENV/bin/python" scripts/demo.py "$@"
