"""`kvside serve --log-requests`: a line per HTTP request once it is answered (streams: once the
last event is sent), with its method, path, status and time; for a reply, what the cache did for
it: the session, the prompt's tokens and how many came from the cache, the tokens written, the time
to the first one, how the reply ended, and the edits binding made to match the client's history.

A line looks like
    2026-12-07 22:31:04 POST /v1/chat/completions 200 7.31s model=qwen2.5-coder-0.5b session=auto-9c1d
    prompt=18477 cached=18447 out=46 ttft=5.05s finish=tool_calls reused_messages=293 dropped_tokens=75
(on one line). Nothing is logged, and nothing is measured, unless the logger is switched on."""

from __future__ import annotations

import contextvars
import logging
import sys
import time

log = logging.getLogger("kvside.requests")

# the reply facts of the request being answered; the endpoints' generators run in tasks that copy
# the request's context, so they fill in the same dict
_reply: contextvars.ContextVar[dict | None] = contextvars.ContextVar("kvside_request_reply", default=None)


def switch_on(stream=sys.stderr) -> None:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def note(**facts) -> None:
    """Add facts to the line of the request being answered (none is logged: nothing happens)."""
    line = _reply.get()
    if line is not None:
        line.update(facts)


def replied(done, binding: dict | None) -> None:
    """A reply of the request being answered has finished (engine Completion; binding's note)."""
    if _reply.get() is None:
        return
    usage = done.usage
    note(session=done.session, prompt=usage.prompt_tokens, cached=usage.cached_tokens, out=usage.completion_tokens,
         ttft=f"{done.t_prefill_s:.2f}s", finish=done.finish_reason)
    from kvside.server.openai_api import binding_facts

    note(**{key: value for key, value in binding_facts(binding).items() if value})
    if done.notices:
        note(auto_edits=",".join(n.get("kind", "roll") for n in done.notices))


class RequestLog:
    """ASGI middleware, outermost: it sees every answer, refusals included."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not log.isEnabledFor(logging.INFO):
            return await self.app(scope, receive, send)
        facts: dict = {}
        token = _reply.set(facts)
        status: list = ["-"]
        t0 = time.perf_counter()

        async def watched(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            _reply.reset(token)
            extra = "".join(f" {k}={v}" for k, v in facts.items() if v is not None)
            log.info("%s %s %s %.2fs%s", scope["method"], scope["path"], status[0], time.perf_counter() - t0, extra)
