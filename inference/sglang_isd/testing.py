"""Helpers for GPU checks of ISD under SGLang, in the manner of transformers.testing_utils: start SGLang servers, talk
to them, build the checkpoints the checks share (tests/gpu and scripts/dev/sglang_gpu_check.py). Every failure raises
with the server's log tail, so a GPU run explains itself. Imports nothing of SGLang (servers are subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from idlm.config import step_rows
from idlm.eval.runner import sglang_isd_stats
from idlm.inference.sglang_isd.config import LAUNCH_FLAGS, grpc_port_env

ROOT = Path(__file__).resolve().parents[2]
# The launch flags of `idlm serve --engine sglang`, plus what the checks need (token ids in and out, quiet logs).
BASE_FLAGS = [*LAUNCH_FLAGS, "--skip-tokenizer-init", "--log-level", "warning",
              # prefill graphs take ~80 s to capture per server and do not touch the decode step measured here
              "--disable-prefill-cuda-graph"]

QWEN3_8B_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 4096, "intermediate_size": 12288,
    "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 151936, "max_position_embeddings": 40960, "rope_theta": 1000000, "rms_norm_eps": 1e-6,
    "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16", "attention_bias": False,
    "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645, "initializer_range": 0.02,
    "use_cache": True, "use_sliding_window": False, "sliding_window": None, "max_window_layers": 36,
    "rope_scaling": None,
}


def isd_flags(stride: int) -> list[str]:
    """ISD with SGLang's default overlap scheduling; IDLM_ISD_OVERLAP=0 in the environment turns it off."""
    off = ["--disable-overlap-schedule"] if os.environ.get("IDLM_ISD_OVERLAP", "1") == "0" else []
    return ["--speculative-algorithm", "ISD", "--speculative-num-draft-tokens", str(step_rows(stride))] + off


def paper_isd_flags(yaml_path: str | Path) -> list[str]:
    """The paper's spelling, translated by the idlm plugin (also exercises that path)."""
    return ["--dllm-algorithm", "IDLMBlockN", "--dllm-algorithm-config", str(yaml_path)]


@dataclass
class SGLangServer:
    """One ``python -m sglang.launch_server`` subprocess, logging to ``log_path``."""

    name: str
    model: str
    port: int
    flags: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    ready_s: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> SGLangServer:
        cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", self.model, "--host", "127.0.0.1",
               "--port", str(self.port), *BASE_FLAGS, *self.flags]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "w")  # noqa: SIM115 (lives as long as the server)
        log.write("+ " + " ".join(cmd) + "\n")
        log.flush()
        self.started_at = time.monotonic()
        env = {**os.environ, **grpc_port_env(self.port), **self.env}
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        return self

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def fail(self, message: str) -> RuntimeError:
        return RuntimeError(f"[{self.name}] {message}\n----- last lines of {self.log_path} -----\n{self.log_tail()}")

    def wait_ready(self, timeout: float) -> float:
        """Block until /get_server_info answers; returns the start-up time in seconds."""
        import httpx

        deadline = self.started_at + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise self.fail(f"the server exited with code {self.proc.returncode} during start-up")
            try:
                r = httpx.get(f"{self.url}/get_server_info", timeout=5, trust_env=False)
                if r.status_code == 200:
                    self.ready_s = time.monotonic() - self.started_at
                    return self.ready_s
            except httpx.HTTPError:
                pass
            time.sleep(2)
        raise self.fail(f"not ready after {timeout:.0f} s")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        import signal

        try:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the server's own process group (start_new_session)
            self.proc.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def server_info(url: str) -> dict:
    import httpx

    return httpx.get(f"{url}/get_server_info", timeout=30, trust_env=False).json()


def generate(url: str, prompts: list[list[int]], max_new_tokens: int, **sampling) -> list[dict]:
    """One /generate call with a batch of token-id prompts (SGLang batches them): [{output_ids, meta_info}, ...]."""
    import httpx

    params = {"max_new_tokens": max_new_tokens, "temperature": 0.0, "ignore_eos": True, **sampling}
    r = httpx.post(f"{url}/generate", json={"input_ids": prompts, "sampling_params": params}, timeout=600,
                   trust_env=False)
    if r.status_code != 200:
        raise RuntimeError(f"{url}/generate answered {r.status_code}: {r.text[:500]}")
    out = r.json()
    out = out if isinstance(out, list) else [out]
    if len(out) != len(prompts):
        raise RuntimeError(f"{url}/generate returned {len(out)} results for {len(prompts)} prompts")
    return out


def output_ids(result: dict) -> list[int]:
    ids = result.get("output_ids")
    if ids is None:
        raise RuntimeError(f"/generate result has no output_ids (keys: {sorted(result)}); was the server started "
                           "with --skip-tokenizer-init?")
    return list(ids)


def decode_tpf(result: dict) -> float | None:
    """(completion tokens - 1) / decode forwards, from SGLang's meta_info (None without spec_verify_ct)."""
    stats = sglang_isd_stats(result)
    return stats["tpf"] if stats else None


MARKOV_LO, MARKOV_HI = 10, 380  # token range of the synthetic language (and of `random_prompts` in the checks)


def train_markov(model, mask_token_id: int, stride: int, steps: int, seed: int = 0, batch_size: int = 64) -> float:
    """Train ``model`` (on a GPU) in place with the [x_t | x_0] objective on a synthetic language: a random prompt
    over [MARKOV_LO, MARKOV_HI), then a continuation that follows a fixed random permutation of that range
    (x_{t+1} = perm[x_t]). A random-weight model has near-flat logits, so bf16 rounding flips its greedy argmax
    all the time; after this, its top-2 gaps are wide, greedy outputs are stable across engines, and its MASK rows
    learn perm^k, so ISD drafts get accepted. Returns the final loss."""
    import torch

    from idlm.config import IDLMConfig
    from idlm.objective import idlm_loss

    g = torch.Generator().manual_seed(seed)
    span = MARKOV_HI - MARKOV_LO
    perm = torch.randperm(span, generator=g) + MARKOV_LO
    device = next(model.parameters()).device
    cfg = IDLMConfig(mask_token_id=mask_token_id, stride=stride)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        prompt_len = int(torch.randint(4, 41, (1,), generator=g))
        length = prompt_len + 56
        ids = torch.randint(MARKOV_LO, MARKOV_HI, (batch_size, length), generator=g)
        for t in range(prompt_len, length):
            ids[:, t] = perm[ids[:, t - 1] - MARKOV_LO]
        labels = ids.clone()
        labels[:, :prompt_len] = -100
        for grp in opt.param_groups:
            grp["lr"] = 2e-3 * min(1.0, (step + 1) / 20) * (1 - step / steps)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = idlm_loss(model, ids.to(device), labels.to(device), cfg).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return float(loss)


def build_tiny_idlm(out_dir: Path, stride: int = 4, seed: int = 0, train_steps: int = 0) -> tuple[Path, int]:
    """A small Qwen3-shaped I-DLM checkpoint (bf16, head_dim 128) on disk, shared by the reference engine and
    SGLang: random weights, then ``train_steps`` steps of `train_markov` on the GPU (0: stay random).
    Returns (checkpoint dir, vocabulary size)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    from idlm.convert import convert
    from idlm.tiny import build_tiny_tokenizer

    base = out_dir / "tiny_base"
    ckpt = out_dir / f"tiny_idlm_n{stride}"
    if (ckpt / "config.json").is_file():
        return ckpt, json.loads((ckpt / "config.json").read_text())["vocab_size"]
    tok = build_tiny_tokenizer(seed=seed)
    cfg = Qwen3Config(vocab_size=len(tok) + 8, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=128, max_position_embeddings=2048,
                      tie_word_embeddings=False, initializer_range=0.05, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    base.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(base)
    tok.save_pretrained(base)
    convert(base=str(base), output=str(ckpt), stride=stride, dtype="bfloat16", overwrite=True)
    if train_steps > 0:
        config_text = (ckpt / "config.json").read_text()  # keeps the idlm block exactly as convert wrote it
        mask_id = json.loads(config_text)["idlm"]["mask_token_id"]
        trained = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).cuda()
        final = train_markov(trained, mask_id, stride, train_steps, seed=seed)
        if not final < 1.0:
            raise RuntimeError(f"train_markov: loss {final:.3f} after {train_steps} steps (expected < 1)")
        trained.to(torch.bfloat16).save_pretrained(ckpt)
        (ckpt / "config.json").write_text(config_text)
        del trained
        torch.cuda.empty_cache()
    return ckpt, cfg.vocab_size


def build_random_gated_lora(base: Path, out_dir: Path, stride: int = 4, rank: int = 8, init_std: float = 0.15) -> Path:
    """A random non-zero gated-LoRA adapter (R-ISD) for the checkpoint ``base``, on its free MASK row: the adapter
    changes the MASK rows' predictions, so R-ISD under SGLang must still give the base model's output.
    ``init_std`` is large enough (0.15 for both factors) that the drafts visibly change (a 0.02 adapter left every
    draft of the tiny model as it was, so an exactness check could not tell whether the adapter ran at all)."""
    from idlm.lora import save_gated_lora

    mask_id = json.loads((base / "config.json").read_text())["idlm"]["mask_token_id"]
    if not (out_dir / "adapter_config.json").is_file():
        save_gated_lora(str(base), out_dir, stride=stride, mask_token_id=mask_id, rank=rank, init_std=init_std)
    return out_dir


def write_dummy_qwen3_8b(out_dir: Path, stride: int = 4) -> Path:
    """A Qwen3-8B config.json with an idlm block: with --load-format dummy SGLang serves random weights of that
    shape (no checkpoint, no tokenizer with --skip-tokenizer-init)."""
    d = out_dir / "qwen3_8b_dummy"
    d.mkdir(parents=True, exist_ok=True)
    cfg = dict(QWEN3_8B_CONFIG, idlm={"format_version": 1, "mask_token_id": 151669, "stride": stride})
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    return d


def random_prompts(count: int, lo: int, hi: int, min_len: int, max_len: int, seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(lo, hi) for _ in range(rng.randint(min_len, max_len))] for _ in range(count)]
