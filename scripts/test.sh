#!/usr/bin/env bash
# The README's test command: set up .venv/ (CPU torch 2.13.0 first) and run the CPU test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k objective
set -euo pipefail
source "$(dirname "$0")/env/venv.sh"
ensure_venv test
cd "$IDLM_ROOT"
exec "$VENV/bin/python" -m pytest -q --timeout 900 "$@"
