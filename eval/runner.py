"""`idlm eval`: run benchmarks against any OpenAI-compatible chat-completions server, resumably.

One request per sample (the paper's protocol), ``concurrency`` requests in flight across all selected benchmarks,
each retried on transport errors, timeouts, 408/429/5xx and malformed answers (bounded, exponential backoff with
jitter), then recorded as an error (scored 0, kept in the denominator, counted in the summary). Other 4xx answers
(a bad request, a too-long prompt) are recorded at once.

Output directory::

    OUT/run.json                  the run's settings (and each resume's)
    OUT/<bench>/samples.jsonl     one JSON line per sample: prompt, response, extracted answer, score, ...
    OUT/<bench>/summary.json      the benchmark's score, counts, settings, the paper's numbers
    OUT/summary.json              all benchmarks of the run
    OUT/.idlm-eval.lock           held (fcntl.flock) by the run writing into OUT; says which process that is

Resuming: a sample whose latest line has a response and a score is not redone; a response without a score is
only re-scored; an errored sample is tried again (unless ``retry_errors`` is off). Lines are appended and flushed
one by one, so a killed run loses at most the requests in flight; at the end each file is compacted to one line
per sample.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import logging
import os
import random
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from idlm.errors import UserError

from . import data as D
from .tasks import DEFAULT_MAX_TOKENS, Benchmark, Item, get_benchmark, resolve_suite, sample_key

log = logging.getLogger(__name__)

RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


@dataclass
class EvalConfig:
    base_url: str
    suite: str = "paper15"
    output: str = "outputs/eval/run"
    model: str | None = None
    limit: int | None = None
    samples: int | None = None  # samples per item for every selected benchmark (default: the benchmark's own)
    concurrency: int = 8
    data_dir: str | None = None
    verify_data: bool = True
    temperature: float = 1.0
    top_p: float = 0.95
    top_k: int = 50
    max_tokens: int | None = None  # default 32768 (the paper's), or the suite file's value
    request_timeout: float = 3600.0
    max_retries: int = 4
    retry_backoff: float = 2.0
    seed: int = 1234
    thinking: bool = True
    retry_errors: bool = True
    skip_missing: bool = False  # a benchmark whose data cannot be loaded is reported and skipped, not fatal
    progress: bool = True
    code_workers: int = 2
    api_key: str | None = None
    extra_body: dict = field(default_factory=dict)

    def public(self) -> dict:
        d = asdict(self)
        d.pop("api_key", None)
        return d


@dataclass
class SampleSpec:
    bench: Benchmark
    item: Item
    sample: int
    variant: str | None
    key: str
    messages: list[dict]
    request: dict


def chat_url(base_url: str) -> str:
    u = base_url.rstrip("/")
    if u.endswith("/chat/completions"):
        return u
    if not u.endswith("/v1"):
        u += "/v1"
    return u + "/chat/completions"


def models_url(base_url: str) -> str:
    u = chat_url(base_url)
    return u[: -len("/chat/completions")] + "/models"


def _loopback(url: str) -> bool:
    """Proxy settings from the environment apply to remote servers only, never to a local one."""
    from urllib.parse import urlparse

    host = (urlparse(url).hostname or "").lower()
    return host in ("localhost", "::1") or host.startswith("127.")


def sample_seed(base: int, key: str) -> int:
    return int(hashlib.sha256(f"{base}:{key}".encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


# ---------------------------------------------------------------------------------------------- record files
def read_records(path: Path) -> dict[str, dict]:
    """Latest record per sample key; a torn last line (a kill mid-write) is skipped."""
    out: dict[str, dict] = {}
    if not path.is_file():
        return out
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "key" in rec:
                out[rec["key"]] = rec
    return out


def _status(rec: dict | None, retry_errors: bool) -> str:
    """'done', 'rescore' or 'todo'."""
    if rec is None:
        return "todo"
    if rec.get("error"):
        return "todo" if retry_errors else "done"
    if rec.get("response") is None:
        return "todo"
    return "done" if rec.get("score") is not None else "rescore"


class _Writer:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        torn = False
        if path.is_file() and path.stat().st_size:
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"  # a kill mid-write left half a line: end it before appending
        self.f = open(path, "a", encoding="utf-8")  # noqa: SIM115
        if torn:
            self.f.write("\n")

    def write(self, rec: dict) -> None:
        self.f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def compact(path: Path, order: list[str]) -> None:
    """Rewrite a samples file with the latest line per key: selected keys first (in order), then the others."""
    recs = read_records(path)
    if not recs:
        return
    keys = [k for k in order if k in recs] + [k for k in recs if k not in set(order)]
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for k in keys:
            f.write(json.dumps(recs[k], ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- output lock
LOCK_NAME = ".idlm-eval.lock"


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``OUT/.idlm-eval.lock`` for the whole run: two runs appending to the same
    samples files would interleave and overwrite each other's summaries. The second one stops at once, naming the
    process that holds the directory (pid, host, start time, command). The kernel drops the lock when the process
    dies, so a killed run never leaves the directory locked."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(path)
            raise UserError(f"{out} is in use by another `idlm eval` ({holder}); wait for it to finish or pass "
                            "another --output") from None
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "command": shlex.join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _lock_holder(path: Path) -> str:
    try:
        h = json.loads(path.read_text(encoding="utf-8"))
        cmd = h.get("command", "")
        return (f"pid {h['pid']} on {h.get('host', '?')}, started {h.get('started', '?')}"
                + (f": {cmd[:200]}" if cmd else ""))
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has just started"


# ---------------------------------------------------------------------------------------------- the client
class RequestFailed(Exception):
    def __init__(self, message: str, retryable: bool):
        super().__init__(message)
        self.retryable = retryable


async def _post_chat(client, url: str, body: dict, timeout: float, headers: dict) -> dict:
    import httpx

    try:
        r = await client.post(url, json=body, timeout=timeout, headers=headers)
    except httpx.TimeoutException as exc:
        raise RequestFailed(f"timeout after {timeout:g} s ({type(exc).__name__})", True) from None
    except httpx.HTTPError as exc:
        raise RequestFailed(f"{type(exc).__name__}: {exc}", True) from None
    if r.status_code != 200:
        try:
            msg = r.json().get("error", {}).get("message") or r.text
        except (ValueError, AttributeError):
            msg = r.text
        raise RequestFailed(f"HTTP {r.status_code}: {str(msg)[:500]}", r.status_code in RETRYABLE_STATUS)
    try:
        data = r.json()
        choice = data["choices"][0]
        msg = choice.get("message") or {}
        content = msg.get("content")
        if content is None and not msg.get("reasoning_content"):
            raise KeyError("message.content")
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise RequestFailed(f"malformed response ({type(exc).__name__}: {exc}): {r.text[:200]}", True) from None
    return data


def _response_text(data: dict) -> tuple[str, str | None]:
    """(full text as the paper's scorers saw it, reasoning). A server with a reasoning parser returns the thinking
    separately; it is put back as ``<think>reasoning</think>content`` so every scorer sees the same shape."""
    msg = data["choices"][0].get("message") or {}
    content = msg.get("content") or ""
    reasoning = msg.get("reasoning_content") or msg.get("reasoning")
    if reasoning:
        return f"<think>{reasoning}</think>{content}", reasoning
    return content, None


def sglang_isd_stats(choice: dict) -> dict | None:
    """{"tpf", "forwards"} of one SGLang speculative response (a request sent with ``"return_meta_info": true``,
    e.g. ``--extra-body '{"return_meta_info": true}'``), in the native server's convention: tokens emitted by decode
    forwards (all but the prefill's first) / decode forwards (SGLang's ``spec_verify_ct``). None otherwise."""
    meta = choice.get("meta_info")
    if not isinstance(meta, dict):
        return None
    forwards, tokens = meta.get("spec_verify_ct"), meta.get("completion_tokens")
    if not isinstance(forwards, int) or not isinstance(tokens, int) or forwards < 1 or tokens < 1:
        return None
    return {"tpf": (tokens - 1) / forwards, "forwards": forwards}


# ---------------------------------------------------------------------------------------------- the run
class EvalRun:
    def __init__(self, cfg: EvalConfig):
        if cfg.concurrency < 1:
            raise UserError(f"--concurrency must be >= 1, got {cfg.concurrency}")
        if cfg.limit is not None and cfg.limit < 1:
            raise UserError(f"--limit must be >= 1, got {cfg.limit}")
        if cfg.samples is not None and cfg.samples < 1:
            raise UserError(f"--samples must be >= 1, got {cfg.samples}")
        if cfg.max_retries < 0:
            raise UserError(f"--max-retries must be >= 0, got {cfg.max_retries}")
        self.cfg = cfg
        self.out = Path(cfg.output)
        self.data_dir = Path(cfg.data_dir) if cfg.data_dir else D.default_data_dir()
        self.names, self.overrides = resolve_suite(cfg.suite)
        self.benches = [get_benchmark(n) for n in self.names]
        self.counters = {"requests": 0, "retries": 0}

    # ------------------------------------------------------------------ planning
    def _samples_for(self, b: Benchmark) -> int:
        o = self.overrides.get(b.name, {})
        return int(self.cfg.samples or o.get("samples") or b.samples)

    def _max_tokens_for(self, b: Benchmark) -> int:
        o = self.overrides.get(b.name, {})
        return int(self.cfg.max_tokens or o.get("max_tokens") or DEFAULT_MAX_TOKENS)

    def plan(self, b: Benchmark) -> tuple[list[Item], list[SampleSpec]]:
        items = b.load(self.data_dir, verify=self.cfg.verify_data)
        limit = self.cfg.limit or self.overrides.get(b.name, {}).get("limit")
        if limit:
            items = items[: int(limit)]
        n = self._samples_for(b)
        specs = []
        for it in items:
            for s in range(n):
                for v in b.variants_for(it):
                    key = sample_key(b.name, it.id, s, v)
                    req = {"max_tokens": self._max_tokens_for(b), "temperature": self.cfg.temperature,
                           "top_p": self.cfg.top_p, "top_k": self.cfg.top_k, "seed": sample_seed(self.cfg.seed, key)}
                    specs.append(SampleSpec(b, it, s, v, key, b.messages(it, v), req))
        return items, specs

    # ------------------------------------------------------------------ one sample
    async def _generate(self, client, url: str, model: str, spec: SampleSpec) -> dict:
        cfg = self.cfg
        body = {"model": model, "messages": spec.messages, **spec.request, **cfg.extra_body}
        if not cfg.thinking:
            body["chat_template_kwargs"] = {"enable_thinking": False}
        headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
        rec: dict[str, Any] = {"key": spec.key, "bench": spec.bench.name, "item_id": spec.item.id,
                               "sample": spec.sample, "variant": spec.variant, "prompt": spec.messages,
                               "request": spec.request}
        attempts, last_err = 0, None
        t0 = time.monotonic()
        for attempt in range(cfg.max_retries + 1):
            attempts += 1
            self.counters["requests"] += 1
            try:
                async with self.sem:
                    data = await _post_chat(client, url, body, cfg.request_timeout, headers)
                text, reasoning = _response_text(data)
                choice = data["choices"][0]
                rec.update(response=text, reasoning_separate=reasoning is not None,
                           finish_reason=choice.get("finish_reason"), usage=data.get("usage"),
                           response_id=data.get("id"), error=None)
                stats = data.get("idlm") if isinstance(data.get("idlm"), dict) else sglang_isd_stats(choice)
                if stats:
                    rec["idlm"] = stats
                break
            except RequestFailed as exc:
                last_err = str(exc)
                if not exc.retryable or attempt == cfg.max_retries:
                    break
                self.counters["retries"] += 1
                delay = min(60.0, cfg.retry_backoff * (2 ** attempt)) * (0.5 + random.random() / 2)
                log.info("%s: %s; retrying in %.1f s", spec.key, exc, delay)
                await asyncio.sleep(delay)
        rec.update(attempts=attempts, latency_s=round(time.monotonic() - t0, 3),
                   time=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        if "response" not in rec:
            rec.update(response=None, error=last_err or "request failed", score=0.0, extracted=None, details={})
        return rec

    async def _score(self, spec: SampleSpec, rec: dict) -> dict:
        b = spec.bench
        try:
            if b.code:
                loop = asyncio.get_running_loop()
                sc = await loop.run_in_executor(self.pool, b.score, spec.item, spec.variant, rec["response"])
            else:
                sc = b.score(spec.item, spec.variant, rec["response"])
            rec.update(score=float(sc.score), extracted=sc.extracted, details=sc.details, score_error=None)
        except Exception as exc:  # noqa: BLE001 - a scorer bug must not stop the run; the sample scores 0
            log.warning("%s: scoring failed: %s: %s", spec.key, type(exc).__name__, exc)
            rec.update(score=0.0, extracted=None, details={}, score_error=f"{type(exc).__name__}: {exc}")
        return rec

    async def _one(self, client, url, model, spec: SampleSpec, prev: dict | None, writer: _Writer, bar) -> None:
        if prev is not None and _status(prev, self.cfg.retry_errors) == "rescore":
            rec = dict(prev)
        else:
            rec = await self._generate(client, url, model, spec)
            if rec.get("error") is None and spec.bench.code:
                writer.write({**rec, "score": None})  # keep the generation even if killed while scoring
        if rec.get("error") is None:
            rec = await self._score(spec, rec)
        writer.write(rec)
        if bar is not None:
            bar.update(1)
            if rec.get("error"):
                bar.set_postfix_str(f"errors {self._errors.get(spec.bench.name, 0) + 1}")
        if rec.get("error"):
            self._errors[spec.bench.name] = self._errors.get(spec.bench.name, 0) + 1

    async def _discover_model(self, client) -> str:
        if self.cfg.model:
            return self.cfg.model
        headers = {"Authorization": f"Bearer {self.cfg.api_key}"} if self.cfg.api_key else {}
        try:
            r = await client.get(models_url(self.cfg.base_url), timeout=30, headers=headers)
            ids = [m.get("id") for m in r.json().get("data", [])]
            if ids and ids[0]:
                return str(ids[0])
        except Exception as exc:  # noqa: BLE001 - any server; fall back to SGLang's "default"
            log.info("could not list models (%s); using 'default'", exc)
        return "default"

    async def _run(self) -> dict:
        import httpx

        cfg = self.cfg
        self.sem = asyncio.Semaphore(cfg.concurrency)
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, cfg.code_workers),
                                                          thread_name_prefix="idlm-sandbox")
        self._errors: dict[str, int] = {}
        plans = []
        self.skipped: dict[str, str] = {}
        for b in self.benches:
            try:
                items, specs = self.plan(b)
                b.prepare()
            except UserError as exc:
                self.skipped[b.name] = str(exc)
                continue
            path = self.out / b.name / "samples.jsonl"
            prev = read_records(path)
            plans.append((b, items, specs, path, prev))
        if self.skipped:
            msg = "; ".join(self.skipped.values())
            if not cfg.skip_missing:
                raise UserError(f"{msg} (--skip-missing runs the other benchmarks)")
            for name, why in self.skipped.items():
                log.warning("skipping %s: %s", name, why)
        limits = httpx.Limits(max_connections=cfg.concurrency + 4, max_keepalive_connections=cfg.concurrency + 4)
        bars = []
        writers = {}
        try:
            async with httpx.AsyncClient(limits=limits, trust_env=not _loopback(cfg.base_url)) as client:
                model = await self._discover_model(client)
                self.model = model
                self._write_run_json(model)
                url = chat_url(cfg.base_url)
                tasks = []
                for pos, (b, _items, specs, path, prev) in enumerate(plans):
                    todo = [s for s in specs if _status(prev.get(s.key), cfg.retry_errors) != "done"]
                    bar = _bar(b.display, len(specs), len(specs) - len(todo), pos, cfg.progress)
                    bars.append(bar)
                    writers[b.name] = w = _Writer(path)
                    for s in todo:
                        tasks.append(self._one(client, url, model, s, prev.get(s.key), w, bar))
                if tasks:
                    await asyncio.gather(*tasks)
        finally:
            for w in writers.values():
                w.close()
            for bar in bars:
                if bar is not None:
                    bar.close()
            self.pool.shutdown(wait=False, cancel_futures=True)
        return self._summarize(plans)

    def run(self) -> dict:
        with output_lock(self.out):
            return asyncio.run(self._run())

    # ------------------------------------------------------------------ results
    def _write_run_json(self, model: str) -> None:
        p = self.out / "run.json"
        prev = {}
        if p.is_file():
            with contextlib.suppress(OSError, json.JSONDecodeError):
                prev = json.loads(p.read_text(encoding="utf-8"))
        runs = prev.get("invocations", [])
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        mine = {"time": now, "config": self.cfg.public(), "model": model, "argv": sys.argv}
        old = (prev.get("invocations") or [{}])[0].get("config", {})
        for k in ("temperature", "top_p", "top_k", "max_tokens", "thinking", "seed"):
            if old and old.get(k) != getattr(self.cfg, k):
                log.warning("resuming %s with %s=%r (the first run used %r); finished samples keep theirs",
                            self.out, k, getattr(self.cfg, k), old.get(k))
        runs.append(mine)
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps({"model": model, "base_url": self.cfg.base_url, "invocations": runs}, indent=2)
                       + "\n", encoding="utf-8")
        os.replace(tmp, p)

    def _summarize(self, plans) -> dict:
        out = {"model": getattr(self, "model", self.cfg.model), "base_url": self.cfg.base_url, "suite": self.cfg.suite,
               "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "benchmarks": {}}
        for b, items, specs, path, _ in plans:
            compact(path, [s.key for s in specs])
            recs = read_records(path)
            s = summarize_benchmark(b, items, specs, recs, self._samples_for(b))
            s.update(model=out["model"], limit=self.cfg.limit, max_tokens=self._max_tokens_for(b),
                     sampling={"temperature": self.cfg.temperature, "top_p": self.cfg.top_p, "top_k": self.cfg.top_k,
                               "thinking": self.cfg.thinking})
            (path.parent / "summary.json").write_text(json.dumps(s, indent=2) + "\n", encoding="utf-8")
            out["benchmarks"][b.name] = s
        for name, why in getattr(self, "skipped", {}).items():
            b = get_benchmark(name)
            out["benchmarks"][name] = {"benchmark": name, "display": b.display, "metric": b.metric, "score": None,
                                       "skipped": why, "n_items": 0, "samples_per_item": self._samples_for(b),
                                       "n_errors": 0, "n_missing": 0, "complete": False, "paper": b.paper}
        prev_path = self.out / "summary.json"
        if prev_path.is_file():  # keep benchmarks of earlier invocations into the same directory
            with contextlib.suppress(OSError, json.JSONDecodeError):
                old = json.loads(prev_path.read_text(encoding="utf-8")).get("benchmarks", {})
                out["benchmarks"] = {**{k: v for k, v in old.items() if k not in out["benchmarks"]},
                                     **out["benchmarks"]}
        prev_path.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
        return out


def summarize_benchmark(b: Benchmark, items: list[Item], specs: list[SampleSpec], recs: dict[str, dict],
                        samples: int) -> dict:
    by_item: dict[str, dict] = {}
    n_done = n_err = n_len = n_missing = 0
    tokens, tpfs, pooled = [], [], [0.0, 0]  # pooled: [tokens emitted by decode forwards, decode forwards]
    for s in specs:
        r = recs.get(s.key)
        if r is None or (r.get("score") is None and not r.get("error")):
            n_missing += 1
            continue
        if r.get("error"):
            n_err += 1
        else:
            n_done += 1
            if r.get("finish_reason") == "length":
                n_len += 1
            ct = (r.get("usage") or {}).get("completion_tokens")
            if isinstance(ct, int | float):
                tokens.append(ct)
            tpf, fwd = (r.get("idlm") or {}).get("tpf"), (r.get("idlm") or {}).get("forwards")
            if isinstance(tpf, int | float) and tpf > 0:
                tpfs.append(tpf)
                if isinstance(fwd, int) and fwd > 0:
                    pooled[0] += tpf * fwd
                    pooled[1] += fwd
        by_item.setdefault(s.item.id, {})[(s.sample, s.variant)] = float(r.get("score") or 0.0)
    item_scores = [b.item_score(it, by_item.get(it.id, {}), samples) for it in items]
    score = 100.0 * sum(item_scores) / len(item_scores) if item_scores else None
    summary = {
        "benchmark": b.name, "display": b.display, "metric": b.metric,
        "score": None if score is None else round(score, 2),
        "n_items": len(items), "samples_per_item": samples, "n_samples": len(specs), "n_scored": n_done,
        "n_errors": n_err, "n_missing": n_missing, "n_truncated": n_len, "complete": n_missing == 0,
        "mean_completion_tokens": round(sum(tokens) / len(tokens), 1) if tokens else None,
        "mean_tpf": round(sum(tpfs) / len(tpfs), 3) if tpfs else None,
        # tokens per forward over all decode forwards of the benchmark (long answers weigh more than in mean_tpf)
        "pooled_tpf": round(pooled[0] / pooled[1], 3) if pooled[1] else None,
        "paper": b.paper,
    }
    summary.update(b.extras(items, recs))
    return summary


def _bar(desc: str, total: int, initial: int, position: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, initial=initial, desc=f"{desc:<16}", position=position, unit="sample",
                dynamic_ncols=True, leave=True, file=sys.stderr)


def run_eval(cfg: EvalConfig) -> dict:
    return EvalRun(cfg).run()
