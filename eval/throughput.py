"""`idlm bench throughput`: serving throughput of an OpenAI-compatible or SGLang server, per concurrency level.

An asyncio streaming client (httpx) keeps at most C requests in flight (a semaphore) and, per level, sends
``--num-prompts`` requests (default 2C, at least 4). Loopback servers only: the benchmark is meant for a server on
this machine and refuses other hosts.

Per request it records the send time t0, the first streamed token t1, the end t2, the completion tokens n and, when
the server reports them, its decode forwards f (`idlm serve`: the ``idlm.forwards`` field; SGLang: ``meta_info.
spec_verify_ct``; for plain AR (``--algorithm ar``) f = n - 1). Per level (all means over requests):

* ``tok_s_total`` = sum(n) / (last t2 - first t0): what the server delivered;
* ``tok_s_per_req`` = mean(n / (t2 - t0)): end-to-end speed a client sees, queueing and TTFT included;
* ``tok_s_per_req_decode`` = mean((n - 1) / (t2 - t1)): decode speed after the first token;
* ``ttft_ms`` = mean(t1 - t0); ``step_ms`` = mean((t2 - t1) / f): the time of one decode forward of the batch the
  request was in (needs f); ``tpf`` = mean((n - 1) / f): tokens per decode forward (the first token comes from the
  prefill, so plain AR has TPF 1.0); with `idlm serve` the server's own per-request TPF is used.

Output: JSON that `idlm tables` reads (``{"format": "idlm-bench-throughput", engine, algorithm, stride, ...,
"results": [per-level entries]}``) and a PNG plot beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from idlm.errors import UserError

log = logging.getLogger(__name__)

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
FORMAT = "idlm-bench-throughput"


@dataclass
class BenchConfig:
    """What to benchmark. api: "openai" (/v1/completions, `idlm serve` or SGLang) or "sglang" (SGLang's /generate,
    which also reports the decode forwards). token_range: synthetic prompts draw ids from [lo, hi)."""

    base_url: str
    concurrency: list[int]
    input_len: int = 512
    output_len: int = 512
    dataset: str | None = None
    num_prompts: int | None = None
    api: str = "openai"
    model: str | None = None
    engine: str | None = None
    algorithm: str | None = None
    stride: int | None = None
    token_range: tuple[int, int] = (10, 300)
    temperature: float = 0.0  # request sampling settings (default greedy); top_k -1 = off
    top_p: float = 1.0
    top_k: int = -1
    seed: int = 0
    timeout: float = 600.0
    output: str = "throughput.json"
    plot: bool = True
    stop_at_eos: bool = False  # False: every request generates exactly output_len tokens (ignore_eos)


@dataclass
class RequestRecord:
    t0: float
    t1: float | None = None
    t2: float | None = None
    tokens: int = 0
    forwards: int | None = None
    tpf: float | None = None
    error: str | None = None


@dataclass
class _Prompt:
    text: str | None = None
    ids: list[int] | None = None
    output_len: int = 512


def check_loopback(url: str) -> str:
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise UserError(f"--base-url must be an http URL such as http://127.0.0.1:8000, got {url!r}")
    if parsed.hostname not in LOOPBACK_HOSTS:
        raise UserError(f"--base-url {url}: the benchmark only talks to a server on this machine (loopback)")
    return url.rstrip("/").removesuffix("/v1")


def make_prompts(cfg: BenchConfig, count: int) -> list[_Prompt]:
    """``count`` prompts: lines of the --dataset JSONL ({"prompt": text} or {"input_ids": [...]}, cycled), else
    synthetic token ids of --input-len."""
    if cfg.dataset:
        path = Path(cfg.dataset)
        if not path.is_file():
            raise UserError(f"--dataset {path} does not exist")
        rows = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{i}: not JSON: {exc}") from None
            if isinstance(obj, dict) and isinstance(obj.get("input_ids"), list):
                rows.append(_Prompt(ids=[int(t) for t in obj["input_ids"]], output_len=cfg.output_len))
            elif isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
                rows.append(_Prompt(text=obj["prompt"], output_len=int(obj.get("max_tokens", cfg.output_len))))
            else:
                raise UserError(f"{path}:{i}: expected an object with 'prompt' (text) or 'input_ids'")
        if not rows:
            raise UserError(f"--dataset {path} holds no prompts")
        return [rows[i % len(rows)] for i in range(count)]
    rng = random.Random(cfg.seed)
    lo, hi = cfg.token_range
    return [_Prompt(ids=[rng.randrange(lo, hi) for _ in range(cfg.input_len)], output_len=cfg.output_len)
            for _ in range(count)]


# ---------------------------------------------------------------------------------------------- streaming
def _openai_body(cfg: BenchConfig, p: _Prompt) -> dict:
    body: dict[str, Any] = {"prompt": p.ids if p.ids is not None else p.text, "max_tokens": p.output_len,
                            "temperature": cfg.temperature, "top_p": cfg.top_p, "stream": True,
                            "ignore_eos": not cfg.stop_at_eos,
                            "stream_options": {"include_usage": True}}
    if cfg.top_k != -1:
        body["top_k"] = cfg.top_k  # an extension of both `idlm serve` and SGLang
    if cfg.model:
        body["model"] = cfg.model
    return body


def _sglang_body(cfg: BenchConfig, p: _Prompt) -> dict:
    body: dict[str, Any] = {"sampling_params": {"max_new_tokens": p.output_len, "temperature": cfg.temperature,
                                                "top_p": cfg.top_p, "top_k": cfg.top_k,
                                                "ignore_eos": not cfg.stop_at_eos},
                            "stream": True}
    if p.ids is not None:
        body["input_ids"] = p.ids
    else:
        body["text"] = p.text
    return body


def parse_event(api: str, data: dict, rec: RequestRecord, now: float) -> None:
    """Fold one streamed JSON event into ``rec`` (first-token time, token count, forwards, TPF)."""
    if "error" in data and not data.get("choices"):
        err = data["error"]
        rec.error = err.get("message", str(err)) if isinstance(err, dict) else str(err)
        return
    if api == "sglang":
        meta = data.get("meta_info") or {}
        n = int(meta.get("completion_tokens") or 0)
        if n > 0 and rec.t1 is None:
            rec.t1 = now
        rec.tokens = max(rec.tokens, n)
        if meta.get("spec_verify_ct"):
            rec.forwards = int(meta["spec_verify_ct"])
        return
    for choice in data.get("choices") or []:
        text = choice.get("text")
        if text is None:
            text = (choice.get("delta") or {}).get("content")
        if text and rec.t1 is None:
            rec.t1 = now
    usage = data.get("usage")
    if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
        rec.tokens = int(usage["completion_tokens"])
    stats = data.get("idlm")
    if isinstance(stats, dict) and stats.get("forwards"):
        rec.forwards = int(stats["forwards"])
        rec.tpf = float(stats.get("tpf") or 0.0) or None


async def _one(client, cfg: BenchConfig, base: str, p: _Prompt, sem: asyncio.Semaphore) -> RequestRecord:
    async with sem:
        rec = RequestRecord(t0=time.perf_counter())
        url = f"{base}/generate" if cfg.api == "sglang" else f"{base}/v1/completions"
        body = _sglang_body(cfg, p) if cfg.api == "sglang" else _openai_body(cfg, p)
        try:
            async with client.stream("POST", url, json=body) as resp:
                if resp.status_code != 200:
                    text = (await resp.aread()).decode(errors="replace")[:300]
                    rec.error = f"HTTP {resp.status_code}: {text}"
                    return rec
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        break
                    try:
                        data = json.loads(payload)
                    except json.JSONDecodeError:
                        continue
                    parse_event(cfg.api, data, rec, time.perf_counter())
        except Exception as exc:  # httpx transport errors, timeouts: recorded, the level goes on
            rec.error = f"{type(exc).__name__}: {exc}"
        rec.t2 = time.perf_counter()
        if rec.t1 is None and rec.tokens:
            rec.t1 = rec.t2
        return rec


def summarize(records: list[RequestRecord], concurrency: int, algorithm: str | None) -> dict:
    """One result entry (see the module docstring for the formulas)."""
    ok = [r for r in records if r.error is None and r.tokens > 0 and r.t2 is not None]
    entry: dict[str, Any] = {"concurrency": concurrency, "num_requests": len(records),
                             "errors": len(records) - len(ok)}
    if not ok:
        entry["error_examples"] = [r.error for r in records if r.error][:3]
        return entry
    start, end = min(r.t0 for r in ok), max(r.t2 for r in ok)
    tokens = sum(r.tokens for r in ok)
    entry.update(completion_tokens=tokens, duration_s=round(end - start, 4),
                 tok_s_total=tokens / max(end - start, 1e-9),
                 tok_s_per_req=statistics.fmean(r.tokens / max(r.t2 - r.t0, 1e-9) for r in ok),
                 ttft_ms=1000 * statistics.fmean(r.t1 - r.t0 for r in ok),
                 ttft_ms_p50=1000 * statistics.median(r.t1 - r.t0 for r in ok))
    decode = [r for r in ok if r.tokens > 1]
    if decode:
        entry["tok_s_per_req_decode"] = statistics.fmean((r.tokens - 1) / max(r.t2 - r.t1, 1e-9) for r in decode)
    for r in decode:
        if r.forwards is None and algorithm == "ar":
            r.forwards = r.tokens - 1
    counted = [r for r in decode if r.forwards]
    if counted:
        entry["forwards_mean"] = statistics.fmean(r.forwards for r in counted)
        entry["step_ms"] = 1000 * statistics.fmean((r.t2 - r.t1) / r.forwards for r in counted)
        entry["tpf"] = statistics.fmean(r.tpf if r.tpf else (r.tokens - 1) / r.forwards for r in counted)
    if entry["errors"]:
        entry["error_examples"] = [r.error for r in records if r.error][:3]
    return entry


async def _detect(client, cfg: BenchConfig, base: str) -> dict:
    """engine/algorithm/stride/model from the server, where it says (flags given by the user win)."""
    found: dict[str, Any] = {}
    try:
        r = await client.get(f"{base}/get_server_info")
        if r.status_code == 200:
            info = r.json()
            found["engine"] = "sglang"
            spec = info.get("speculative_algorithm")
            found["algorithm"] = "isd" if spec == "ISD" else ("ar" if spec is None else str(spec).lower())
            rows = info.get("speculative_num_draft_tokens")
            found["stride"] = (int(rows) + 1) // 2 if spec == "ISD" and rows else 1
            found["model"] = info.get("served_model_name") or info.get("model_path")
    except Exception:  # not SGLang, or an older one
        pass
    if "engine" not in found:
        try:
            r = await client.get(f"{base}/v1/models")
            if r.status_code == 200:
                data = (r.json().get("data") or [{}])[0]
                found["model"] = data.get("id")
                if data.get("owned_by") == "idlm":
                    found.update(engine="native", algorithm="isd")
        except Exception:
            pass
    return found


async def run_bench(cfg: BenchConfig) -> dict:
    import httpx

    base = check_loopback(cfg.base_url)
    if cfg.api not in ("openai", "sglang"):
        raise UserError(f"--api must be openai or sglang, got {cfg.api!r}")
    if not cfg.concurrency or any(c < 1 for c in cfg.concurrency):
        raise UserError(f"--concurrency needs positive integers, got {cfg.concurrency}")
    limits = httpx.Limits(max_connections=max(cfg.concurrency) + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(cfg.timeout), limits=limits, trust_env=False) as client:
        found = await _detect(client, cfg, base)
        if not found:
            raise UserError(f"no server answers at {base} (tried /get_server_info and /v1/models)")
        engine = cfg.engine or found.get("engine")
        algorithm = cfg.algorithm or found.get("algorithm")
        stride = cfg.stride if cfg.stride is not None else found.get("stride")
        model = cfg.model or found.get("model")
        if cfg.api == "openai" and cfg.model is None and model:
            cfg.model = model
        results = []
        for c in cfg.concurrency:
            count = cfg.num_prompts or max(2 * c, 4)
            prompts = make_prompts(cfg, count)
            sem = asyncio.Semaphore(c)
            records = await asyncio.gather(*(_one(client, cfg, base, p, sem) for p in prompts))
            entry = summarize(list(records), c, algorithm)
            log.info("C=%d: %s", c, entry)
            results.append(entry)
    return {"format": FORMAT, "engine": engine, "algorithm": algorithm, "stride": stride, "model": model,
            "dataset": Path(cfg.dataset).name if cfg.dataset else f"random-{cfg.input_len}in",
            "input_len": None if cfg.dataset else cfg.input_len, "max_tokens": cfg.output_len, "api": cfg.api,
            "stop_at_eos": cfg.stop_at_eos,
            "sampling": {"temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k},
            "base_url": base, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "results": results}


def write_plot(result: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed; no plot")
        return None
    rows = [e for e in result["results"] if e.get("tok_s_total") is not None]
    if not rows:
        return None
    label = " ".join(str(result.get(k)) for k in ("engine", "algorithm") if result.get(k))
    if result.get("stride"):
        label += f" N={result['stride']}"
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    cs = [e["concurrency"] for e in rows]
    for ax, key, ylabel in ((axes[0], "tok_s_total", "tokens/s (all requests)"),
                            (axes[1], "tok_s_per_req", "tokens/s per request")):
        ax.plot(cs, [e[key] for e in rows], marker="o", label=label or None)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if label:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- CLI
def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", required=True, help="server on this machine, e.g. http://127.0.0.1:8000")
    p.add_argument("--concurrency", type=_int_list, default=[1, 8, 32, 64], help="levels, e.g. 1,8,32,64")
    p.add_argument("--input-len", type=int, default=512, help="synthetic prompt length in tokens (default 512)")
    p.add_argument("--output-len", type=int, default=512, help="tokens to generate per request (default 512)")
    p.add_argument("--dataset", default=None, help="JSONL of {'prompt': text} or {'input_ids': [...]} instead")
    p.add_argument("--num-prompts", type=int, default=None, help="requests per level (default 2C, at least 4)")
    p.add_argument("--api", default="openai", choices=["openai", "sglang"],
                   help="openai: /v1/completions (default); sglang: SGLang's /generate (reports decode forwards)")
    p.add_argument("--model", default=None, help="model name for the API (default: the server's)")
    p.add_argument("--engine", default=None, help="label (default: detected: native or sglang)")
    p.add_argument("--algorithm", default=None, help="label, isd or ar (default: detected); ar implies n-1 forwards")
    p.add_argument("--stride", type=int, default=None, help="label (default: detected where the server says)")
    p.add_argument("--token-range", default="10,300", help="synthetic prompt ids are drawn from [lo, hi)")
    p.add_argument("--temperature", type=float, default=0.0, help="request temperature (default 0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="request top_p (default 1: off)")
    p.add_argument("--top-k", type=int, default=-1, help="request top_k (default -1: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    p.add_argument("--output", default="throughput.json",
                   help="JSON path, or a directory for throughput.json (the plot goes beside it as .png)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--stop-at-eos", action="store_true",
                   help="let requests end at the model's end of turn (default: ignore_eos, exactly --output-len "
                        "tokens each; real prompts on real weights want this, random ids do not)")


def run_cli(args: argparse.Namespace) -> int:
    if args.input_len < 1 or args.output_len < 1:
        raise UserError("--input-len and --output-len must be >= 1")
    try:
        lo, hi = (int(x) for x in args.token_range.split(","))
    except ValueError:
        raise UserError(f"--token-range must be LO,HI, got {args.token_range!r}") from None
    if not 0 <= lo < hi:
        raise UserError(f"--token-range needs 0 <= LO < HI, got {lo},{hi}")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or (args.top_k < 1 and args.top_k != -1):
        raise UserError("--temperature must be >= 0, --top-p in (0, 1], --top-k -1 (off) or >= 1")
    cfg = BenchConfig(base_url=args.base_url, concurrency=args.concurrency, input_len=args.input_len,
                      output_len=args.output_len, dataset=args.dataset, num_prompts=args.num_prompts, api=args.api,
                      model=args.model, engine=args.engine, algorithm=args.algorithm, stride=args.stride,
                      token_range=(lo, hi), temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                      seed=args.seed, timeout=args.timeout, output=args.output,
                      plot=not args.no_plot, stop_at_eos=args.stop_at_eos)
    result = asyncio.run(run_bench(cfg))
    out = Path(cfg.output)
    if out.is_dir() or out.suffix != ".json":  # a directory: the JSON goes inside it
        out = out / "throughput.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    if cfg.plot:
        png = write_plot(result, out.with_suffix(".png"))
        if png:
            print(f"wrote {png}")
    for e in result["results"]:
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in e.items()
                       if k != "error_examples"))
    failed = sum(e.get("errors", 0) for e in result["results"])
    return 1 if failed else 0

