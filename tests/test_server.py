"""`idlm serve`: a real uvicorn server on 127.0.0.1 over the real ISD engine on a tiny checkpoint, real HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import httpx
import pytest
from pydantic import BaseModel

from idlm.errors import UserError
from idlm.inference.runner import EngineRunner
from idlm.inference.server import bind_socket, create_app, serve, server_url
from tests.helpers import tiny_idlm_checkpoint

MODEL_NAME = "tiny-idlm"
MAX_REQUEST_BYTES = 1 << 20  # the test server's body limit (the default is 8 MiB)
CHAT_PROMPTS = ["What is 2 plus 3?", "the cat sat on the mat"]
TEXT_PROMPTS = ["What is 7 plus 5? The answer is", "one two three four"]


def _wait(predicate, timeout: float, what: str, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="module")
def idlm_dir(tmp_path_factory):
    return tiny_idlm_checkpoint(tmp_path_factory.mktemp("serve"), stride=3)


@pytest.fixture(scope="module")
def server(idlm_dir):
    import uvicorn

    from idlm.inference.engine import ISDEngine

    engine = ISDEngine.from_pretrained(idlm_dir, max_batch_size=8)
    runner = EngineRunner(engine).start()
    app = create_app(runner, MODEL_NAME, max_request_bytes=MAX_REQUEST_BYTES)
    sock = bind_socket("127.0.0.1", 0)
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, name="test-uvicorn", daemon=True)
    thread.start()
    try:
        _wait(lambda: uv.started or not thread.is_alive(), 30, "the server to start")
        assert uv.started, "uvicorn did not start"
        # a second engine on the same weights, driven directly, gives the reference outputs
        reference = ISDEngine.from_pretrained(idlm_dir, max_batch_size=8)
        yield SimpleNamespace(url=server_url(sock), runner=runner, engine=engine, reference=reference,
                              tokenizer=engine.tokenizer, dir=idlm_dir)
    finally:
        uv.should_exit = True
        thread.join(15)
        runner.stop()
        sock.close()
    assert not thread.is_alive(), "uvicorn did not shut down"


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


_REFERENCE: dict[tuple, object] = {}


def _direct(srv, prompt_ids: list[int], max_tokens: int):
    """Greedy output of the reference engine (`ISDEngine.generate`) run directly on one prompt (cached)."""
    from idlm.inference.engine import SamplingParams

    key = (tuple(prompt_ids), max_tokens)
    if key not in _REFERENCE:
        eos = srv.tokenizer.eos_token_id
        params = SamplingParams(max_new_tokens=max_tokens, temperature=0.0, stop_token_ids=(eos,))
        _REFERENCE[key] = srv.reference.generate([prompt_ids], params)[0]
    return _REFERENCE[key]


def _chat_ids(tokenizer, content: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                        tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def _sse_events(lines) -> list:
    events = []
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: "), line
        payload = line[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def _idle(srv) -> bool:
    return srv.runner.num_requests() == (0, 0) and not srv.runner.call(lambda e: e.has_unfinished())


# ---------------------------------------------------------------------------------------------------------------
def test_health_and_models(client):
    assert client.get("/health").json() == {"status": "ok"}
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [MODEL_NAME]


def test_concurrent_requests_are_batched_and_match_direct_generation(server):
    max_tokens = 24
    jobs = []  # (route, body, stream, prompt ids)
    for content in CHAT_PROMPTS:
        for stream in (False, True):
            body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": content}],
                    "max_tokens": max_tokens, "temperature": 0, "stream": stream}
            if stream:
                body["stream_options"] = {"include_usage": True}
            jobs.append(("/v1/chat/completions", body, stream, _chat_ids(server.tokenizer, content)))
    for prompt in TEXT_PROMPTS:
        for stream in (False, True):
            body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                    "stream": stream, **({"stream_options": {"include_usage": True}} if stream else {})}
            jobs.append(("/v1/completions", body, stream, server.tokenizer.encode(prompt)))

    async def one(client: httpx.AsyncClient, route: str, body: dict, stream: bool):
        if not stream:
            r = await client.post(route, json=body)
            assert r.status_code == 200, r.text
            return r.json()
        async with client.stream("POST", route, json=body) as r:
            assert r.status_code == 200, await r.aread()
            assert r.headers["content-type"].startswith("text/event-stream")
            return _sse_events([line async for line in r.aiter_lines()])

    async def run_all():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            return await asyncio.gather(*(one(client, route, body, stream) for route, body, stream, _ in jobs))

    steps_before = server.runner.stats.steps
    results = asyncio.run(run_all())
    steps = server.runner.stats.steps - steps_before
    assert server.runner.stats.max_batch_seen > 1, "concurrent requests never shared an engine step"

    texts: dict[tuple[str, str], dict[bool, str]] = {}
    for (route, body, stream, prompt_ids), result in zip(jobs, results):
        ref = _direct(server, prompt_ids, max_tokens)
        ref_text = server.tokenizer.decode(ref.token_ids, skip_special_tokens=True)
        chat = route.endswith("chat/completions")
        if stream:
            assert result[-1] == "[DONE]"
            chunks = result[:-1]
            assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == len(ref.token_ids)
            chunks = chunks[:-1]
            assert {c["object"] for c in chunks} == {"chat.completion.chunk" if chat else "text_completion"}
            assert len({c["id"] for c in chunks}) == 1
            if chat:
                assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
                text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
            else:
                text = "".join(c["choices"][0]["text"] for c in chunks)
            reasons = [c["choices"][0]["finish_reason"] for c in chunks]
            assert reasons[:-1] == [None] * (len(reasons) - 1)
            assert reasons[-1] == ref.finish_reason
            assert chunks[-1]["idlm"]["forwards"] >= 1
        else:
            assert result["object"] == ("chat.completion" if chat else "text_completion")
            assert result["model"] == MODEL_NAME
            choice = result["choices"][0]
            text = choice["message"]["content"] if chat else choice["text"]
            if chat:
                assert choice["message"]["role"] == "assistant"
            assert choice["finish_reason"] == ref.finish_reason
            assert result["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": len(ref.token_ids),
                                       "total_tokens": len(prompt_ids) + len(ref.token_ids)}
            stats = result["idlm"]
            assert stats["forwards"] >= 1 and stats["tpf"] >= 1.0 and isinstance(stats["acceptance"], list)
            assert stats["forwards"] <= len(ref.token_ids)
        assert text == ref_text, (route, stream)
        texts.setdefault((route, json.dumps(body.get("messages") or body.get("prompt"))), {})[stream] = text
    for key, pair in texts.items():
        assert pair[True] == pair[False], key
    # batched: fewer engine steps than the forwards the requests needed one at a time
    forwards = sum(r[-2]["idlm"]["forwards"] if isinstance(r, list) else r["idlm"]["forwards"] for r in results)
    assert steps < forwards, (steps, forwards)


def test_stop_strings_truncate(server, client):
    prompt = TEXT_PROMPTS[0]
    ref = _direct(server, server.tokenizer.encode(prompt), 24)
    ref_text = server.tokenizer.decode(ref.token_ids, skip_special_tokens=True)
    assert len(ref_text) >= 8, ref_text
    stop = ref_text[4:7]
    expected = ref_text[:ref_text.index(stop)]
    body = {"prompt": prompt, "max_tokens": 24, "temperature": 0, "stop": [stop, "\x00never"]}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == expected
    assert r.json()["choices"][0]["finish_reason"] == "stop"
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        events = _sse_events(list(r.iter_lines()))
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == expected
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    _wait(lambda: _idle(server), 10, "the stopped requests to leave the engine")


def test_seeded_sampling_is_reproducible(client):
    body = {"messages": [{"role": "user", "content": "count: one two"}], "max_tokens": 12, "temperature": 0.9,
            "top_p": 0.95, "top_k": 50, "seed": 1234}
    first = client.post("/v1/chat/completions", json=body)
    assert first.status_code == 200, first.text
    again = client.post("/v1/chat/completions", json=body)
    assert again.json()["choices"][0]["message"]["content"] == first.json()["choices"][0]["message"]["content"]


class _CharTokenizer:
    """decode() of byte tokens: an incomplete UTF-8 sequence at the end comes out as U+FFFD, as HF tokenizers do."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def test_text_tracker_holds_back_partial_characters_and_stop_strings():
    from idlm.inference.server_stream import TextTracker

    data = "héllo wörld STOP after".encode()
    tracker = TextTracker(_CharTokenizer(), ["STOP"])
    pieces, hit = [], False
    for end in range(1, len(data) + 1):
        delta, hit = tracker.update(list(data[:end]), final=False)
        assert "\ufffd" not in delta and not delta.endswith(("S", "ST", "STO"))
        pieces.append(delta)
        if hit:
            break
    assert hit and "".join(pieces) == "héllo wörld " == tracker.text
    tracker = TextTracker(_CharTokenizer(), ["zz"])
    assert tracker.update(list("ab\u00e9".encode()[:-1]), final=False) == ("ab", False)
    assert tracker.update(list("ab\u00e9z".encode()), final=False) == ("\u00e9", False)
    assert tracker.update(list("ab\u00e9z!".encode()), final=True) == ("z!", False)


BAD_REQUESTS = [
    # (route, raw body or JSON, status, words the message must contain, param)
    ("/v1/chat/completions", b"{not json", 400, ["not valid JSON"], None),
    ("/v1/chat/completions", b"", 400, ["empty"], None),
    ("/v1/chat/completions", [1, 2], 400, ["JSON object"], None),
    ("/v1/chat/completions", {"max_tokens": 4}, 400, ["messages", "required"], "messages"),
    ("/v1/chat/completions", {"messages": []}, 400, ["messages", "at least one"], "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, ["messages", "list"], "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, ["messages[0].role"], "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, ["messages[0].content"], "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, ["messages[0].role"],
     "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": "10"}, 400,
     ["max_tokens", "integer"], "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400,
     ["temperature"], "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400,
     ["stream"], "stream"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400,
     ["max_tokens", "at least 1"], "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -3}, 400,
     ["max_completion_tokens"], "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, 400,
     ["max_tokens", "context"], "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, ["'n'"], "n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stop": 5}, 400, ["stop"], "stop"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, ["top_p"],
     "top_p"),
    ("/v1/completions", {"prompt": "one two " * 2000, "max_tokens": 4}, 400, ["prompt", "context"], "prompt"),
    ("/v1/completions", {"prompt": [5, 6, 10 ** 9]}, 400, ["prompt[2]", "vocabulary"], "prompt[2]"),
    ("/v1/completions", {"prompt": ""}, 400, ["prompt", "empty"], "prompt"),
    ("/v1/completions", {"prompt": 12}, 400, ["prompt"], "prompt"),
    ("/v1/completions", {"max_tokens": 3}, 400, ["prompt", "required"], "prompt"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, ["temperature"], "temperature"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 5}, 400, ["logprobs"], "logprobs"),
    ("/v1/nonexistent", {"prompt": "hi"}, 404, ["unknown route", "/v1/nonexistent"], None),
]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(client):
    for route, body, status, words, param in BAD_REQUESTS:
        if isinstance(body, bytes):
            r = client.post(route, content=body, headers={"content-type": "application/json"})
        else:
            r = client.post(route, json=body)
        assert r.status_code == status, (route, body, r.status_code, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["type"] == "invalid_request_error"
        for word in words:
            assert word in err["message"], (body, err["message"])
        assert err["param"] == param, (body, err)
    r = client.get("/v1/chat/completions")
    assert r.status_code == 405 and "not allowed" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
                                                  "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")


class _TypedBody(BaseModel):
    count: int


def test_framework_validation_errors_use_the_openai_format(server):
    app = create_app(server.runner, MODEL_NAME)

    @app.post("/typed")
    async def typed(body: _TypedBody):
        return {"count": body.count}

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as ac:
            assert (await ac.post("/typed", json={"count": 3})).json() == {"count": 3}
            r = await ac.post("/typed", json={"count": "many"})
            assert r.status_code == 400
            assert r.json()["error"]["param"] == "count" and "count" in r.json()["error"]["message"]
            r = await ac.post("/typed", content=b"{oops", headers={"content-type": "application/json"})
            assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]

    asyncio.run(run())


def test_chat_prompt_without_a_template(server):
    import copy

    from idlm.inference.server import _Server

    tokenizer = copy.deepcopy(server.tokenizer)
    tokenizer.chat_template = None
    runner = SimpleNamespace(tokenizer=tokenizer, engine=server.engine, max_context=server.runner.max_context)
    ids = _Server(runner, "x").chat_prompt([{"role": "system", "content": "be brief"},
                                            {"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    assert tokenizer.decode(ids) == "system: be brief\nuser: hi\nassistant:"


def _long_body(stream: bool) -> dict:
    return {"prompt": "one two three", "max_tokens": 900, "ignore_eos": True, "temperature": 0, "stream": stream}


def test_client_disconnect_aborts_the_request(server, client):
    aborted, finished = server.runner.stats.aborted, server.runner.stats.finished
    # streaming: read the first content chunk, then hang up
    with httpx.Client(base_url=server.url, timeout=30) as other:
        with other.stream("POST", "/v1/completions", json=_long_body(True)) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                    break
    _wait(lambda: server.runner.stats.aborted > aborted and _idle(server), 10, "the streamed request to be aborted")
    # non-streaming: the client times out and closes the connection
    with httpx.Client(base_url=server.url, timeout=0.3) as other, pytest.raises(httpx.ReadTimeout):
        other.post("/v1/completions", json=_long_body(False))
    _wait(lambda: server.runner.stats.aborted > aborted + 1 and _idle(server), 10,
          "the non-streamed request to be aborted")
    assert server.runner.stats.finished == finished  # neither ran to its end
    # a request waiting for a batch slot is dropped when its client leaves, before it ever runs
    batch_size = server.runner.max_batch_size
    server.runner.max_batch_size = 1  # (read by the worker at each admission) one long request fills the batch
    try:
        with httpx.Client(base_url=server.url, timeout=30) as holder:
            with holder.stream("POST", "/v1/completions", json=_long_body(True)) as r:
                assert r.status_code == 200 and server.runner.num_requests()[0] == 1
                aborted = server.runner.stats.aborted
                with httpx.Client(base_url=server.url, timeout=0.5) as other, pytest.raises(httpx.ReadTimeout):
                    other.post("/v1/completions", json=_long_body(False))
                _wait(lambda: server.runner.stats.aborted == aborted + 1, 10, "the queued request to be dropped")
                assert server.runner.num_requests() == (1, 0)
    finally:
        server.runner.max_batch_size = batch_size
    _wait(lambda: _idle(server), 10, "the long request to be aborted")
    assert server.runner.stats.finished == finished
    r = client.post("/v1/completions", json={"prompt": "one", "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    assert _idle(server)


def test_engine_failure_fails_the_request_with_500_and_the_server_survives(server, client):
    def break_once(engine):
        original = engine.step

        def failing_step():
            engine.step = original
            raise RuntimeError("simulated engine fault")

        engine.step = failing_step

    for stream in (False, True):
        server.runner.call(break_once)
        r = client.post("/v1/completions", json={"prompt": "one two", "max_tokens": 8, "stream": stream})
        assert r.status_code == 500, r.text
        err = r.json()["error"]
        assert err["type"] == "server_error" and "simulated engine fault" in err["message"]
    r = client.post("/v1/completions", json={"prompt": "one two", "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200
    assert client.get("/health").json() == {"status": "ok"}
    _wait(lambda: _idle(server), 10, "the engine to drain")


@pytest.mark.parametrize("adaptive", [False, True])
def test_cli_serve(idlm_dir, tmp_path, adaptive):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    bad = subprocess.run([sys.executable, "-m", "idlm", "serve", "--model", idlm_dir, "--engine", "sglang"],
                         capture_output=True, text=True, timeout=60, env=env)
    # the CPU test environment has no sglang (serve extra): one clear line, exit code 2
    assert bad.returncode == 2 and "sglang is not installed" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    log = tmp_path / "serve.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "idlm", "serve", "--model", idlm_dir, "--port", "0",
                                 "--served-model-name", "cli-tiny", "--max-request-bytes", "4096",
                                 *(["--adaptive-stride", "--max-batch-size", "4"] if adaptive else [])],
                                stdout=subprocess.PIPE, stderr=err,
                                text=True, env=env)
    lines: queue.Queue = queue.Queue()

    def read() -> None:
        for x in proc.stdout:
            lines.put(x)
        lines.put("")  # EOF: the process ended

    threading.Thread(target=read, daemon=True).start()
    try:
        try:
            line = lines.get(timeout=60)  # the server prints its URL once it is ready
        except queue.Empty:
            line = ""
        assert "ready at http://127.0.0.1:" in line, (line, proc.poll(), log.read_text()[-2000:])
        url = line.split("ready at ")[1].split()[0]
        assert url.endswith("/v1")
        with httpx.Client(base_url=url, timeout=30) as c:
            assert c.get("/models").json()["data"][0]["id"] == "cli-tiny"
            r = c.post("/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                                                  "temperature": 0})
            assert r.status_code == 200, r.text
            r = c.post("/chat/completions", json={"messages": [{"role": "user", "content": "x" * 5000}]})
            assert r.status_code == 413 and "4096 bytes" in r.json()["error"]["message"]
        if adaptive:  # the measured step costs, by batch size 1, 2, 4, for every N
            assert "adaptive stride N <= " in log.read_text() and "4: [" in log.read_text()
    finally:
        proc.terminate()  # uvicorn shuts down gracefully, then re-raises SIGTERM
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    assert proc.returncode in (0, -15), (proc.returncode, log.read_text()[-2000:])


def test_serve_reports_unusable_ports_and_models(idlm_dir):
    taken = bind_socket("127.0.0.1", 0)
    try:
        with pytest.raises(UserError, match="cannot listen on 127.0.0.1"):
            serve(idlm_dir, port=taken.getsockname()[1])
    finally:
        taken.close()
    with pytest.raises(UserError, match="model not found"):
        serve("/nonexistent/model", port=0)
    with pytest.raises(UserError, match="--max-request-bytes must be >= 1"):
        serve(idlm_dir, port=0, max_request_bytes=0)


# ---------------------------------------------------------------------------------------------------------------
# hostile input: a 4xx naming the field, never a 5xx, and one bad request never harms another

def _deep(depth: int) -> bytes:
    return b'{"prompt": "hi", "max_tokens": 2, "x": ' + b"[" * depth + b"]" * depth + b"}"


HOSTILE_REQUESTS = [
    # (route, raw JSON body, words the message must contain, param)
    ("/v1/completions", b'{"prompt": "a \\ud800 b", "max_tokens": 2}', ["surrogate"], "prompt"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udfff"}], "max_tokens": 2}',
     ["surrogate", "messages[0].content"], "messages[0].content"),
    ("/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}], "max_tokens": 2}',
     ["surrogate"], "messages[0].content[0].text"),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": 2, "stop": ["\\ud83d"]}', ["surrogate"], "stop[0]"),
    ("/v1/completions", _deep(50_000), ["nests deeper than"], None),
    ("/v1/completions", _deep(150), ["nests deeper than", "x"], "x"),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": ' + b"7" * 5000 + b"}", ["5000 digits"], None),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": 2, "temperature": 0.5, "top_k": 9223372036854775808}',
     ["'top_k'", "2^63"], "top_k"),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": 2, "temperature": 0.5, "top_k": 18446744073709551616}',
     ["'top_k'"], "top_k"),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": 2, "temperature": 0.5, "seed": 9223372036854775808}',
     ["'seed'", "2^63"], "seed"),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": 2, "seed": -9223372036854775809}', ["'seed'"], "seed"),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": 2, "temperature": NaN}', ["'temperature'", "nan"],
     "temperature"),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": 2, "temperature": Infinity}', ["'temperature'"],
     "temperature"),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": 2, "temperature": 1e308}', ["'temperature'", "100"],
     "temperature"),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": 2, "temperature": 1e999}', ["'temperature'"], "temperature"),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": 2, "top_p": NaN}', ["'top_p'"], "top_p"),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": 2, "stop": "' + b"z" * 600 + b'"}', ["'stop'", "512"],
     "stop"),
    ("/v1/chat/completions", b'{"messages": [{"role": ["user"], "content": "hi"}], "max_tokens": 2}',
     ["messages[0].role", "list"], "messages[0].role"),
    ("/v1/completions", b'{"prompt": [1, 2, ' + b"9" * 900 + b"]}", ["prompt[2]", "vocabulary"], "prompt[2]"),
    ("/v1/completions", b'{"prompt": "hi", "n": ' + b"9" * 900 + b"}", ["'n'", "digits"], "n"),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": "' + b"x" * 5000 + b'"}', ["max_tokens", "characters"],
     "max_tokens"),
    ("/v1/completions", b'\xff\xfe{"prompt": "hi"}', ["not valid JSON"], None),
]


@pytest.mark.parametrize("route,body,words,param", HOSTILE_REQUESTS,
                         ids=[f"{i}-{p or 'body'}" for i, (_, _, _, p) in enumerate(HOSTILE_REQUESTS)])
def test_hostile_requests_get_400_naming_the_field(server, client, route, body, words, param):
    errors_before = server.runner.stats.step_errors
    r = client.post(route, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, (body[:80], r.status_code, r.text[:300])
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param, (body[:80], err)
    for word in words:
        assert word in err["message"], (body[:80], err["message"])
    assert len(err["message"]) < 400, err["message"]  # hostile values are not echoed back in full
    assert server.runner.stats.step_errors == errors_before
    r = client.post("/v1/completions", json={"prompt": "one two", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200, r.text


def test_request_size_limit_answers_413(server, client):
    filler = "x" * (MAX_REQUEST_BYTES + 1000)
    r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "user": filler})
    assert r.status_code == 413, r.text[:300]
    err = r.json()["error"]
    assert err["code"] == "request_too_large" and str(MAX_REQUEST_BYTES) in err["message"]
    assert "--max-request-bytes" in err["message"]

    def chunks():  # no Content-Length: the limit applies to the bytes as they arrive
        yield b'{"prompt": "hi", "max_tokens": 2, "user": "'
        for _ in range(MAX_REQUEST_BYTES // 65536 + 2):
            yield b"y" * 65536
        yield b'"}'

    with httpx.Client(base_url=server.url, timeout=30) as other:
        r = other.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    below = {"prompt": "hi", "max_tokens": 2, "temperature": 0, "user": "z" * (MAX_REQUEST_BYTES - 1000)}
    r = client.post("/v1/completions", json=below)
    assert r.status_code == 200, r.text[:300]


async def _stream_text(client: httpx.AsyncClient, body: dict, started: asyncio.Event) -> tuple[str, list]:
    """Stream a completion; sets ``started`` at its first text; returns (text, the parsed events)."""
    events = []
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line:
                continue
            events.append(line)
            payload = line[len("data: "):]
            if payload != "[DONE]" and json.loads(payload).get("choices") and json.loads(payload)["choices"][0].get(
                    "text"):
                started.set()
    parsed = _sse_events(events)
    text = "".join(e["choices"][0]["text"] for e in parsed if isinstance(e, dict) and e.get("choices"))
    return text, parsed


def test_hostile_request_beside_a_stream_in_flight(server):
    """top_k = 2^63 used to crash the engine step and end every request batched with it."""
    long_body = {"prompt": "one two three", "max_tokens": 60, "ignore_eos": True, "temperature": 0}
    ref = server.tokenizer.decode(
        server.reference.generate([server.tokenizer.encode(long_body["prompt"])],
                                  _greedy(60))[0].token_ids, skip_special_tokens=True)

    async def run():
        started = asyncio.Event()
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as ac:
            stream = asyncio.ensure_future(_stream_text(ac, long_body, started))
            await asyncio.wait_for(started.wait(), 30)
            hostile = []
            for field in ("top_k", "seed"):
                hostile.append(await ac.post("/v1/completions", json={"prompt": "hi", "max_tokens": 5,
                                                                       "temperature": 0.7, field: 2 ** 63}))
            return await stream, hostile

    errors_before = server.runner.stats.step_errors
    (text, events), hostile = asyncio.run(run())
    assert [r.status_code for r in hostile] == [400, 400]
    assert [r.json()["error"]["param"] for r in hostile] == ["top_k", "seed"]
    assert events[-1] == "[DONE]" and not any("error" in e for e in events if isinstance(e, dict))
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert text == ref
    assert server.runner.stats.step_errors == errors_before


def _greedy(max_tokens: int):
    from idlm.inference.engine import SamplingParams

    return SamplingParams(max_new_tokens=max_tokens, temperature=0.0, stop_token_ids=())


def test_a_request_that_breaks_the_engine_step_ends_alone(server):
    """The engine's per-request guard: a request whose parameters break the batched step after admission (set past
    add_request's checks, as no client can) fails alone with a 500; the request beside it finishes as if alone."""
    long_body = {"prompt": "one two three", "max_tokens": 60, "ignore_eos": True, "temperature": 0}
    ref = server.tokenizer.decode(
        server.reference.generate([server.tokenizer.encode(long_body["prompt"])], _greedy(60))[0].token_ids,
        skip_special_tokens=True)
    victim = {"prompt": "four five", "max_tokens": 400, "ignore_eos": True, "temperature": 0.8, "seed": 3}

    def sabotage(engine) -> int:
        hit = 0
        for req in engine._requests.values():  # the sampled request, now in the batch
            if req.params.temperature > 0:
                req.params.top_k = 2 ** 64  # torch.tensor cannot hold it: the next batched step raises
                hit += 1
        return hit

    async def run():
        started = asyncio.Event()
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as ac:
            stream = asyncio.ensure_future(_stream_text(ac, long_body, started))
            await asyncio.wait_for(started.wait(), 30)
            bad = asyncio.ensure_future(ac.post("/v1/completions", json=victim))
            for _ in range(500):
                if server.runner.num_requests()[0] == 2:
                    break
                await asyncio.sleep(0.01)
            hit = await asyncio.wrap_future(server.runner.call_future(sabotage))
            return await stream, await bad, hit

    failed_before = server.runner.stats.failed
    (text, events), bad, hit = asyncio.run(run())
    assert hit == 1
    assert bad.status_code == 500, bad.text
    err = bad.json()["error"]
    assert err["type"] == "server_error" and "the engine failed on this request" in err["message"]
    assert "Overflow" in err["message"]
    assert events[-1] == "[DONE]" and not any("error" in e for e in events if isinstance(e, dict))
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert text == ref
    assert server.runner.stats.failed == failed_before + 1
    _wait(lambda: _idle(server), 10, "the engine to drain")


@pytest.mark.parametrize("mode", ["sample", "argmax"])
def test_draft_mode_reaches_sampled_requests(server, mode):
    """`idlm serve --draft-mode` (create_app's draft_mode) is how the native server drafts sampled requests: its
    seeded output equals the reference engine's with that mode, token for token."""
    from idlm.inference.engine import SamplingParams

    app = create_app(server.runner, MODEL_NAME, draft_mode=mode)
    body = {"prompt": "one two three", "max_tokens": 16, "temperature": 1.0, "top_p": 1.0, "seed": 11,
            "ignore_eos": True}

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as ac:
            return await ac.post("/v1/completions", json=body)

    r = asyncio.run(run())
    assert r.status_code == 200, r.text
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=1.0, seed=11, draft_mode=mode)
    want = server.reference.generate([server.tokenizer.encode(body["prompt"])], params)[0]
    assert r.json()["choices"][0]["text"] == server.tokenizer.decode(want.token_ids)
    with pytest.raises(ValueError, match="unknown draft mode"):
        create_app(server.runner, MODEL_NAME, draft_mode="paper-ish")
