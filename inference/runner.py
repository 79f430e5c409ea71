"""The engine runner: one background thread owns an (un-thread-safe) ISD engine and serves many asyncio callers.

Callers on an event loop ``await runner.submit(prompt_ids, params)`` and iterate the returned stream; the
worker thread takes new requests and aborts from a locked inbox, calls ``engine.step()`` while there is work
(so concurrent requests share the same batched forwards) and hands each ``RequestOutput`` to its waiting
request through ``loop.call_soon_threadsafe``. It sleeps on a condition variable when idle.

The runner also keeps at most ``max_batch_size`` requests inside the engine; further ones wait (FIFO) in the
runner. An exception from ``engine.step()`` fails the requests that were in that step and leaves the worker
running; a ``ValueError`` from ``engine.add_request`` rejects that request only (a bad input), and an output with
``finish_reason == "error"`` (the engine's per-request guard) fails that request only.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


class RequestRejected(Exception):
    """The engine refused the request as bad input (its ``add_request`` raised ``ValueError``)."""


class EngineFailure(Exception):
    """The engine failed while running the request (or the runner stopped); not the caller's fault."""


@dataclass
class _Request:
    request_id: str
    prompt_ids: list[int]
    params: Any
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    accepted: asyncio.Future
    in_engine: bool = False


@dataclass
class RunnerStats:
    """Counters since start (read without a lock: approximate while requests are in flight)."""

    submitted: int = 0
    rejected: int = 0
    finished: int = 0
    aborted: int = 0
    failed: int = 0
    steps: int = 0
    step_errors: int = 0
    max_batch_seen: int = 0
    finish_reasons: dict[str, int] = field(default_factory=dict)


class RequestStream:
    """The outputs of one submitted request, in order; ends after the output with ``finished=True``."""

    def __init__(self, runner: EngineRunner, request: _Request):
        self._runner = runner
        self._req = request
        self.finished = False

    @property
    def request_id(self) -> str:
        return self._req.request_id

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        while not self.finished:
            item = await self._req.queue.get()
            if isinstance(item, BaseException):
                self.finished = True
                raise item
            if item.finished:
                self.finished = True
            yield item

    def abort(self) -> None:
        """Stop the request (frees its batch slot); safe to call more than once or after it finished."""
        if not self.finished:
            self.finished = True
            self._runner.abort(self._req.request_id)


class EngineRunner:
    """Owns ``engine`` on one worker thread. ``start()`` before use, ``stop()`` at the end.

    The engine needs ``add_request(prompt_ids, params, request_id)``, ``abort(request_id)``,
    ``has_unfinished()`` and ``step()`` (see inference/engine.py); ``tokenizer`` and ``max_context`` are read
    by the server.
    """

    def __init__(self, engine: Any, max_batch_size: int | None = None, name: str = "idlm-engine"):
        self.engine = engine
        self.max_batch_size = int(max_batch_size or getattr(engine, "max_batch_size", 0) or 16)
        self.stats = RunnerStats()
        self._name = name
        self._cond = threading.Condition()
        self._inbox: list[_Request] = []
        self._aborts: list[str] = []
        self._calls: list[tuple[Callable[[Any], Any], concurrent.futures.Future]] = []
        self._stopping = False
        self._thread: threading.Thread | None = None
        # worker-thread state
        self._waiting: collections.deque[_Request] = collections.deque()
        self._active: dict[str, _Request] = {}
        self._consecutive_step_errors = 0

    # ------------------------------------------------------------------ public, any thread
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_context(self) -> int:
        return int(self.engine.max_context)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> EngineRunner:
        if self.is_alive():
            return self
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Fail all pending requests, let the worker finish its current step and join it."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("engine worker did not stop within %.0f s", timeout)

    async def submit(self, prompt_ids: list[int], params: Any, request_id: str | None = None) -> RequestStream:
        """Queue a request; returns once the engine accepted it.

        Raises RequestRejected (bad input, the engine's message), EngineFailure (the engine broke or the runner
        is stopped). If the caller is cancelled while waiting, the request is aborted.
        """
        if not self.is_alive():
            raise EngineFailure("the engine worker is not running")
        loop = asyncio.get_running_loop()
        req = _Request(
            request_id=request_id or uuid.uuid4().hex,
            prompt_ids=list(prompt_ids),
            params=params,
            loop=loop,
            queue=asyncio.Queue(),
            accepted=loop.create_future(),
        )
        with self._cond:
            if self._stopping:
                raise EngineFailure("the server is shutting down")
            self._inbox.append(req)
            self.stats.submitted += 1
            self._cond.notify_all()
        try:
            await req.accepted
        except asyncio.CancelledError:
            self.abort(req.request_id)
            raise
        return RequestStream(self, req)

    def abort(self, request_id: str) -> None:
        """Thread-safe and idempotent; unknown or finished ids are ignored."""
        with self._cond:
            self._aborts.append(request_id)
            self._cond.notify_all()

    def call(self, fn: Callable[[Any], Any], timeout: float | None = 30.0) -> Any:
        """Run ``fn(engine)`` on the worker thread, between steps, and return its result (blocking)."""
        return self.call_future(fn).result(timeout)

    def call_future(self, fn: Callable[[Any], Any]) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._stopping or not self.is_alive():
                fut.set_exception(EngineFailure("the engine worker is not running"))
                return fut
            self._calls.append((fn, fut))
            self._cond.notify_all()
        return fut

    def num_requests(self) -> tuple[int, int]:
        """(running in the engine, waiting for a batch slot), as the worker last saw them."""
        return len(self._active), len(self._waiting)

    # ------------------------------------------------------------------ worker thread
    def _has_work(self) -> bool:
        return bool(self._active) or (bool(self._waiting) and len(self._active) < self.max_batch_size)

    def _engine_busy(self) -> bool:
        try:
            return bool(self.engine.has_unfinished())
        except Exception:
            log.exception("engine.has_unfinished() failed")
            return False

    def _run(self) -> None:
        try:
            while True:
                busy = self._engine_busy() and (self._active or self._consecutive_step_errors == 0)
                with self._cond:
                    while not (self._stopping or self._inbox or self._aborts or self._calls
                               or busy or self._has_work()):
                        self._cond.wait()
                    if self._stopping:
                        break
                    inbox, self._inbox = self._inbox, []
                    aborts, self._aborts = self._aborts, []
                    calls, self._calls = self._calls, []
                self._waiting.extend(inbox)
                for rid in aborts:
                    self._abort(rid)
                self._admit()
                for fn, fut in calls:
                    if fut.set_running_or_notify_cancel():
                        try:
                            fut.set_result(fn(self.engine))
                        except BaseException as exc:  # noqa: BLE001 - handed to the caller
                            fut.set_exception(exc)
                if self._active or (self._engine_busy() and self._consecutive_step_errors == 0):
                    self._step()
        except BaseException:  # a bug in the runner itself: fail everyone rather than hang them
            log.exception("engine worker crashed")
            raise
        finally:
            self._shutdown()

    def _admit(self) -> None:
        while self._waiting and len(self._active) < self.max_batch_size:
            req = self._waiting.popleft()
            try:
                self.engine.add_request(req.prompt_ids, req.params, request_id=req.request_id)
            except ValueError as exc:
                self.stats.rejected += 1
                self._resolve(req, RequestRejected(str(exc)))
                continue
            except Exception as exc:
                log.exception("engine.add_request failed")
                self.stats.failed += 1
                self._resolve(req, EngineFailure(f"the engine failed to add the request: {exc}"))
                continue
            req.in_engine = True
            self._active[req.request_id] = req
            self._resolve(req, None)
        self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(self._active))

    def _abort(self, request_id: str) -> None:
        req = self._active.pop(request_id, None)
        if req is None:
            for i, waiting in enumerate(self._waiting):
                if waiting.request_id == request_id:
                    del self._waiting[i]
                    self.stats.aborted += 1
                    self._resolve(waiting, EngineFailure("request aborted before it started"))
                    break
            return
        self.stats.aborted += 1
        try:
            self.engine.abort(request_id)
        except Exception:
            log.exception("engine.abort(%s) failed", request_id)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:
            log.exception("engine.step() failed; failing %d request(s)", len(self._active))
            self.stats.step_errors += 1
            self._consecutive_step_errors += 1
            failed, self._active = self._active, {}
            for rid, req in failed.items():
                self.stats.failed += 1
                self._deliver(req, EngineFailure(f"the engine failed: {type(exc).__name__}: {exc}"))
                try:
                    self.engine.abort(rid)
                except Exception:
                    log.debug("engine.abort(%s) after a failed step also failed", rid, exc_info=True)
            return
        self._consecutive_step_errors = 0
        self.stats.steps += 1
        for out in outputs:
            req = self._active.get(out.request_id)
            if req is None:  # aborted meanwhile
                continue
            if out.finish_reason == "error":  # the engine's per-request guard ended this request alone
                del self._active[out.request_id]
                self.stats.failed += 1
                self._deliver(req, EngineFailure(f"the engine failed on this request: {out.error}"))
                continue
            if out.finished:  # book-keeping first: the caller may look at the runner as soon as it has the output
                del self._active[out.request_id]
                self.stats.finished += 1
                reason = str(out.finish_reason)
                self.stats.finish_reasons[reason] = self.stats.finish_reasons.get(reason, 0) + 1
            self._deliver(req, out)

    def _shutdown(self) -> None:
        with self._cond:
            self._stopping = True
            self._waiting.extend(self._inbox)
            self._inbox = []
            calls, self._calls = self._calls, []
        for _, fut in calls:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(EngineFailure("the engine worker stopped"))
        for req in list(self._waiting):
            self._resolve(req, EngineFailure("the server is shutting down"))
        self._waiting.clear()
        for rid, req in list(self._active.items()):
            self._deliver(req, EngineFailure("the server is shutting down"))
            try:
                self.engine.abort(rid)
            except Exception:
                log.debug("engine.abort(%s) at shutdown failed", rid, exc_info=True)
        self._active.clear()

    # delivery onto the caller's event loop
    @staticmethod
    def _resolve(req: _Request, error: BaseException | None) -> None:
        def settle() -> None:
            if req.accepted.done():
                return
            if error is None:
                req.accepted.set_result(True)
            else:
                req.accepted.set_exception(error)

        try:
            req.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    @staticmethod
    def _deliver(req: _Request, item: Any) -> None:
        try:
            req.loop.call_soon_threadsafe(req.queue.put_nowait, item)
        except RuntimeError:
            pass
