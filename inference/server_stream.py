"""Streaming for `idlm serve` (inference/server.py): the text handed out piece by piece with stop strings held back,
server-sent-event framing, and what happens when the client goes away mid-request."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import Request


class TextTracker:
    """Decodes the whole token list at each update and hands out the new suffix of the text.

    Trailing U+FFFD (an incomplete multi-byte character) and a tail that could begin a stop string are held
    back until they resolve, so the streamed pieces concatenate to exactly the final text.
    """

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.text = ""  # the final text so far (everything handed out)
        self.sent = 0

    def update(self, token_ids: list[int], final: bool) -> tuple[str, bool]:
        """(new text, stop string seen)."""
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        hit = None
        for s in self.stop:
            i = text.find(s, max(0, self.sent - len(s) + 1))
            if i >= 0 and (hit is None or i < hit):
                hit = i
        if hit is not None:
            end = max(hit, self.sent)
        elif final:
            end = len(text)
        else:
            end = len(text)
            while end > self.sent and text[end - 1] == "\ufffd":
                end -= 1
            hold = 0
            for s in self.stop:
                for k in range(min(len(s) - 1, end - self.sent), hold, -1):
                    if text[end - k:end] == s[:k]:
                        hold = k
                        break
            end -= hold
        end = max(end, self.sent)
        delta = text[self.sent:end]
        self.text = self.text[:self.sent] + delta
        self.sent = end
        return delta, hit is not None


class ClientGone(Exception):
    """The client went away before its response was complete."""


async def wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, awaitable: Any) -> Any:
    """Await ``awaitable``; cancel it and raise ClientGone if the client disconnects first."""
    task = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()  # a cancelled submit aborts its request; a cancelled collect aborts through events()
    if not task.done() or task.cancelled():
        raise ClientGone()
    return task.result()


def sse_event(obj: dict) -> str:
    """One server-sent event carrying ``obj`` as compact JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
