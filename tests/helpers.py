"""Small builders shared by several test modules."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from idlm.losses import IGNORE_INDEX
from idlm.tiny import tiny_config


def tiny_model(arch: str = "qwen3", vocab_size: int = 64, dtype=torch.float64, seed: int = 0, **kw):
    """A random tiny causal LM (no tokenizer) in eval mode; float64 for exactness tests."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(arch, vocab_size=vocab_size, attn_implementation="sdpa", **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def random_batch(rows: list[tuple[int, int, int]], vocab: int, seed: int = 0, left_pad: bool = False):
    """input_ids, labels, attention_mask [B, L] for rows given as (prompt_len, response_len, pad_len)."""
    g = torch.Generator().manual_seed(seed)
    L = max(p + r + pad for p, r, pad in rows)
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    labels = torch.full((len(rows), L), IGNORE_INDEX)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for i, (p, r, _) in enumerate(rows):
        n = p + r
        toks = torch.randint(1, vocab - 1, (n,), generator=g)
        sl = slice(L - n, L) if left_pad else slice(0, n)
        ids[i, sl] = toks
        mask[i, sl] = 1
        lab = toks.clone()
        lab[:p] = IGNORE_INDEX
        labels[i, sl] = lab
    return ids, labels, mask


def write_recipe(tmp_path, body: dict) -> str:
    """``body`` as a recipe YAML file in ``tmp_path``; returns its path."""
    import yaml

    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(body))
    return str(p)


def pids_with_cwd_token(token: str) -> list[int]:
    """Processes (of any session) whose working directory's path contains ``token``: how the sandbox tests find
    what a sample left running."""
    import os

    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if token in os.readlink(f"/proc/{pid}/cwd"):
                    out.append(int(pid))
            except OSError:
                continue
    return out


def leftovers(token: str, wait_s: float = 1.5) -> list[int]:
    """The processes marked by ``token`` still alive after up to ``wait_s`` seconds; they are killed before
    returning, whatever the test then asserts."""
    import os
    import signal
    import time

    deadline = time.monotonic() + wait_s
    while True:
        pids = pids_with_cwd_token(token)
        if not pids or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return pids


def tiny_idlm_checkpoint(root, stride: int, seed: int = 0) -> str:
    """A tiny Qwen3-shaped base under ``root``/base converted into an I-DLM checkpoint at ``root``/ckpt (`idlm
    convert`, 8 free embedding rows): the model that the server and serving tests start real processes on."""
    from idlm.convert import convert
    from idlm.tiny import build_tiny_model

    root = Path(root)
    build_tiny_model(root / "base", arch="qwen3", free_rows=8, seed=seed)
    convert(base=str(root / "base"), output=str(root / "ckpt"), stride=stride)
    return str(root / "ckpt")


def run_in_triton_interpreter(module: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m module`` with TRITON_INTERPRET=1 and no GPU visible, from the repository root: a kernel test on CPU
    needs its own process, because triton picks interpreted or compiled mode when it is first imported."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", module], cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=timeout)
