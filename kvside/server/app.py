"""The HTTP daemon: OpenAI-compatible endpoints, llama.cpp's /infill and /health, and kvside's own
session and edit endpoints. Handlers never let an exception through: every failure becomes an
OpenAI-shaped error with a fitting status, and the daemon keeps serving."""

from __future__ import annotations

import asyncio
import hmac
import json
import os
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from kvside.engine import Engine
from kvside.engine.session import check_name
from kvside.errors import InvalidRequest, KvsideError, ModelNotFound
from kvside.server import openai_api as oa
from kvside.server.binding import best_match

KEEPALIVE_S = 5.0
CHAT_KINDS = ("chat", "tool")


class PayloadTooLarge(KvsideError):
    status = 413
    kind = "invalid_request_error"
    code = "payload_too_large"


class Unauthorized(KvsideError):
    status = 401
    kind = "invalid_request_error"
    code = "invalid_api_key"


class Overloaded(KvsideError):
    status = 429
    kind = "rate_limit_error"
    code = "too_many_requests"


def error_response(exc: KvsideError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(exc.to_openai(), status_code=exc.status, headers=headers)


class Daemon:
    def __init__(self, engine: Engine, *, api_key: str | None = None, max_body: int = 8 * 1024 * 1024,
                 max_active: int = 32, reuse: bool = True, keepalive_s: float = KEEPALIVE_S):
        self.engine = engine
        info = engine.info()
        self.model_name = info["model_name"]
        self.model_aliases = {self.model_name, "default", os.path.basename(info["model"]["path"])}
        self.api_key = api_key
        self.max_body = max_body
        self.max_active = max_active
        self.reuse = reuse
        self.keepalive_s = keepalive_s
        self.active = 0
        # one generation per resident session at most; further requests wait here, in a queue
        # bounded by max_active, instead of failing for want of a cache slot
        self.slots = asyncio.Semaphore(info["max_sessions"])
        self.claimed: set[str] = set()  # sessions a request is bound to right now
        self.owned: set[str] = set()  # sessions auto-binding created (and may reuse)
        self._counter = 0
        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/infill", self.infill, methods=["POST"]),
            Route("/kvside/sessions", self.list_sessions, methods=["GET"]),
            Route("/kvside/sessions/{name}", self.show_session, methods=["GET"]),
            Route("/kvside/sessions/{name}", self.delete_session, methods=["DELETE"]),
            Route("/kvside/sessions/{name}/{edit}", self.edit_session, methods=["POST"]),
            Route("/kvside/restore", self.restore_session, methods=["POST"]),
        ]
        self.app = Starlette(routes=routes, exception_handlers={
            KvsideError: self._on_error, HTTPException: self._on_http, Exception: self._on_error})

    # -- plumbing -------------------------------------------------------------------------------
    async def _on_error(self, request, exc: Exception) -> JSONResponse:
        if isinstance(exc, KvsideError):
            headers = {"Retry-After": "1"} if isinstance(exc, Overloaded) or exc.status == 503 else None
            return error_response(exc, headers)
        return error_response(KvsideError(f"internal error: {type(exc).__name__}"))

    async def _on_http(self, request, exc: HTTPException) -> JSONResponse:
        err = KvsideError(exc.detail if isinstance(exc.detail, str) else "error")
        err.status, err.kind = exc.status_code, "invalid_request_error"
        err.code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(err)

    def _auth(self, request: HTTPRequest) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise Unauthorized("invalid or missing API key")

    async def _json(self, request: HTTPRequest) -> Any:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_body:
            raise PayloadTooLarge(f"request body over {self.max_body} bytes")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > self.max_body:
                raise PayloadTooLarge(f"request body over {self.max_body} bytes")
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequest("request body is not valid UTF-8") from None
        try:
            return json.loads(text) if text.strip() else {}
        except json.JSONDecodeError as exc:
            raise InvalidRequest(f"request body is not valid JSON: {exc.msg}") from None

    def _check_model(self, model: str | None) -> None:
        if model is not None and model not in self.model_aliases:
            raise ModelNotFound(f"model {model!r} is not served here (this daemon serves {self.model_name!r})", param="model")

    async def _admit(self) -> None:
        if self.active >= self.max_active:
            raise Overloaded(f"{self.active} requests in flight; try again shortly")
        self.active += 1
        try:
            await self.slots.acquire()
        except BaseException:
            self.active -= 1
            raise

    def _done(self, name: str, temporary: bool) -> None:
        self.active -= 1
        self.slots.release()
        self.claimed.discard(name)
        if temporary:
            self.engine.submit(lambda core: core.delete_session(name, True), session=name)

    # -- binding --------------------------------------------------------------------------------
    def _bind_chat(self, messages: list[dict], explicit: str | None) -> tuple[str, list[dict], bool, dict]:
        """Which session answers, which messages are new, whether it is temporary, what was reused."""
        if explicit:
            check_name(explicit)
            if explicit in self.claimed:
                pass  # the engine serializes requests to one session; this one waits its turn
            known = {r["name"] for r in self.engine.sessions()}
            if explicit not in known:
                self.engine.new_session(explicit)
                self.claimed.add(explicit)
                return explicit, messages, False, {}
            held = self._chat_messages(self.engine.messages(explicit))
            match = best_match({explicit: held}, messages)
            self.claimed.add(explicit)
            if match is None:
                return explicit, messages, False, {}
            return explicit, match.new, False, self._apply(match)
        if not self.reuse:
            return self.engine.new_session(), messages, True, {}
        candidates = self.engine.call(lambda core: {
            n: [m.to_dict() for m in s.messages] for n, s in core.sessions.items()
            if n in self.owned and n not in self.claimed and not s.busy
        })
        match = best_match({n: self._chat_messages(h) for n, h in candidates.items()}, messages)
        if match is not None:
            self.claimed.add(match.session)
            return match.session, match.new, False, self._apply(match)
        self._counter += 1
        name = self.engine.new_session(f"auto-{os.getpid()}-{self._counter}")
        self.owned.add(name)
        self.claimed.add(name)
        return name, messages, False, {}

    def _attach_documents(self, name: str, documents: list[str]) -> list[dict]:
        """Attach the named documents the session does not hold yet (no prefill of them)."""
        held = {e.get("document") for e in self.engine.edit_log(name) if e.get("edit") == "attach"}
        from kvside.engine import compose

        out = []
        for doc in documents:
            key, _ = compose.find(doc)
            if key not in held:
                out.append(self.engine.attach(name, doc))
        return out

    @staticmethod
    def _chat_messages(messages: list[dict]) -> list[dict]:
        return [m for m in messages if m.get("kind") in CHAT_KINDS]

    def _apply(self, match) -> dict:
        """The client dropped messages from the front: drop their cells, keep the later KV. The hole
        stays until positions run out (a shift re-rotates every cell of the cache, see close_gaps)."""
        note = {"reused_messages": match.reused}
        if match.dropped:
            report = self.engine.mask(match.session, messages=match.dropped, close_gap=False)
            note["dropped_messages"] = match.dropped
            note["dropped_tokens"] = report["masked"]
        return note

    # -- streaming helpers ----------------------------------------------------------------------
    def _pipe(self):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        return queue, lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev)

    async def _first(self, queue: asyncio.Queue):
        """The first event if it comes soon; an early error becomes a proper HTTP error."""
        try:
            event = await asyncio.wait_for(queue.get(), timeout=self.keepalive_s)
        except asyncio.TimeoutError:
            return None
        if event.kind == "error":
            raise event.data["error"]
        return event

    async def _events(self, queue: asyncio.Queue, first) -> AsyncIterator:
        if first is not None:
            yield first
            if first.kind in ("done", "error"):
                return
        while True:
            try:
                event = await asyncio.wait_for(queue.get(), timeout=self.keepalive_s)
            except asyncio.TimeoutError:
                yield None  # a keep-alive comment during a long prefill
                continue
            yield event
            if event.kind in ("done", "error"):
                return

    async def _collect(self, request: HTTPRequest, stream, queue) -> Any:
        """Wait for a non-streamed reply, cancelling it if the client goes away."""
        while True:
            try:
                event = await asyncio.wait_for(queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    stream.cancel()
                continue
            if event.kind == "error":
                raise event.data["error"]
            if event.kind == "done":
                return stream.completion

    # -- endpoints ------------------------------------------------------------------------------
    async def health(self, request: HTTPRequest) -> JSONResponse:
        return JSONResponse({"status": "ok", "model": self.model_name, "active": self.active})

    async def models(self, request: HTTPRequest) -> JSONResponse:
        self._auth(request)
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": 0, "owned_by": "kvside"}]})

    async def chat_completions(self, request: HTTPRequest):
        self._auth(request)
        req = oa.parse_chat(await self._json(request))
        self._check_model(req.model)
        explicit = request.headers.get("x-kvside-session") or req.session
        await self._admit()
        name, temporary = "", False
        try:
            name, new, temporary, note = await run_in_threadpool(self._bind_chat, req.messages, explicit)
            if req.documents:
                note["attached"] = await run_in_threadpool(self._attach_documents, name, req.documents)
            queue, on_event = self._pipe()
            stream = self.engine.chat(name, new, on_event=on_event, **req.params)
            first = await self._first(queue) if req.stream else None
        except BaseException:
            self._done(name, temporary)
            raise
        cid = oa.new_id("chatcmpl")
        headers = {"X-Kvside-Session": name}
        if req.stream:
            return StreamingResponse(self._sse_chat(stream, queue, first, cid, req, name, temporary, note),
                                     media_type="text/event-stream", headers=headers)
        try:
            done = await self._collect(request, stream, queue)
        finally:
            self._done(name, temporary)
        extra = {"kvside": {"session": name, "notices": done.notices, **note}}
        return JSONResponse(oa.chat_response(cid, self.model_name, done.text, oa.finish_reason(done.finish_reason),
                                             done.usage.to_dict(), extra), headers=headers)

    async def _sse_chat(self, stream, queue, first, cid, req, name, temporary, note):
        model = self.model_name
        try:
            yield _sse(oa.chat_chunk(cid, model, {"role": "assistant", "content": ""}, None))
            async for event in self._events(queue, first):
                if event is None:
                    yield ": keep-alive\n\n"
                elif event.kind == "text":
                    yield _sse(oa.chat_chunk(cid, model, {"content": event.text}, None))
                elif event.kind == "notice":
                    yield f": kvside {json.dumps(event.data)}\n\n"
                elif event.kind == "error":
                    yield _sse(event.data["error"].to_openai())
                    break
                elif event.kind == "done":
                    done = stream.completion
                    yield _sse(oa.chat_chunk(cid, model, {}, oa.finish_reason(done.finish_reason)))
                    if req.include_usage:
                        yield _sse(oa.usage_chunk(cid, model, done.usage.to_dict()))
            yield "data: [DONE]\n\n"
        finally:
            if not stream.done:
                stream.cancel()  # the client went away
            self._done(name, temporary)

    async def completions(self, request: HTTPRequest):
        self._auth(request)
        req = oa.parse_completion(await self._json(request))
        self._check_model(req.model)
        return await self._text_request(request, req, "text_completion")

    async def infill(self, request: HTTPRequest):
        self._auth(request)
        body = await self._json(request)
        if not isinstance(body, dict):
            raise InvalidRequest("the request body must be a JSON object")
        prefix, suffix = body.get("input_prefix", ""), body.get("input_suffix", "")
        if not isinstance(prefix, str) or not isinstance(suffix, str):
            raise InvalidRequest("'input_prefix' and 'input_suffix' must be strings")
        extra = body.get("prompt", "")
        translated = dict(body, prompt=prefix + (extra if isinstance(extra, str) else ""), suffix=suffix)
        if "n_predict" in body and "max_tokens" not in body:
            translated["max_tokens"] = body["n_predict"]
        req = oa.parse_completion(translated)
        return await self._text_request(request, req, "infill")

    async def _text_request(self, request: HTTPRequest, req: oa.Request, shape: str):
        explicit = request.headers.get("x-kvside-session") or req.session
        await self._admit()
        name, temporary = "", False
        try:
            if explicit:
                check_name(explicit)
                known = {r["name"] for r in await run_in_threadpool(self.engine.sessions)}
                if explicit not in known:
                    await run_in_threadpool(self.engine.new_session, explicit)
                name = explicit
            else:
                name, temporary = await run_in_threadpool(self.engine.new_session), True
            queue, on_event = self._pipe()
            if req.suffix is not None:
                tokens = await run_in_threadpool(self.engine.call, lambda core: fim_tokens(core, req.prompt, req.suffix))
                stream = self.engine.complete_tokens(name, tokens, on_event=on_event, **req.params)
            else:
                if not req.prompt:
                    raise InvalidRequest("the prompt is empty", param="prompt")
                stream = self.engine.complete(name, req.prompt, on_event=on_event, **req.params)
            first = await self._first(queue) if req.stream else None
        except BaseException:
            self._done(name, temporary)
            raise
        cid = oa.new_id("cmpl")
        if req.stream:
            return StreamingResponse(self._sse_text(stream, queue, first, cid, req, name, temporary, shape),
                                     media_type="text/event-stream", headers={"X-Kvside-Session": name})
        try:
            done = await self._collect(request, stream, queue)
        finally:
            self._done(name, temporary)
        if shape == "infill":
            return JSONResponse({"content": done.text, "stop": True, "stop_type": done.finish_reason,
                                 "tokens_predicted": done.usage.completion_tokens,
                                 "tokens_evaluated": done.usage.prompt_tokens})
        body = oa.completion_chunk(cid, self.model_name, done.text, oa.finish_reason(done.finish_reason))
        body["usage"] = done.usage.to_dict()
        return JSONResponse(body)

    async def _sse_text(self, stream, queue, first, cid, req, name, temporary, shape):
        model = self.model_name
        try:
            async for event in self._events(queue, first):
                if event is None:
                    yield ": keep-alive\n\n"
                elif event.kind == "text":
                    chunk = {"content": event.text, "stop": False} if shape == "infill" else \
                        oa.completion_chunk(cid, model, event.text, None)
                    yield _sse(chunk)
                elif event.kind == "error":
                    yield _sse(event.data["error"].to_openai())
                    break
                elif event.kind == "done":
                    done = stream.completion
                    if shape == "infill":
                        yield _sse({"content": "", "stop": True, "stop_type": done.finish_reason})
                    else:
                        yield _sse(oa.completion_chunk(cid, model, "", oa.finish_reason(done.finish_reason)))
                        if req.include_usage:
                            yield _sse(oa.usage_chunk(cid, model, done.usage.to_dict(), "text_completion"))
            if shape != "infill":
                yield "data: [DONE]\n\n"
        finally:
            if not stream.done:
                stream.cancel()
            self._done(name, temporary)

    # -- kvside's own endpoints -----------------------------------------------------------------
    async def list_sessions(self, request: HTTPRequest) -> JSONResponse:
        self._auth(request)
        return JSONResponse({"sessions": await run_in_threadpool(self.engine.sessions)})

    async def show_session(self, request: HTTPRequest) -> JSONResponse:
        self._auth(request)
        name = check_name(request.path_params["name"])

        def show(core):
            s = core.get(name)
            return {"session": s.summary(), "messages": [m.to_dict() for m in s.messages],
                    "cache_map": s.ledger.runs(), "removed": [vars(r) for r in s.ledger.removed],
                    "edit_log": s.edit_log}

        return JSONResponse(await run_in_threadpool(self.engine.call, show, session=name))

    async def delete_session(self, request: HTTPRequest) -> JSONResponse:
        self._auth(request)
        name = check_name(request.path_params["name"])
        await run_in_threadpool(self.engine.delete_session, name)
        self.owned.discard(name)
        return JSONResponse({"deleted": name})

    async def edit_session(self, request: HTTPRequest) -> JSONResponse:
        self._auth(request)
        name = check_name(request.path_params["name"])
        edit = request.path_params["edit"]
        body = await self._json(request)
        if not isinstance(body, dict):
            raise InvalidRequest("the request body must be a JSON object")
        e = self.engine
        calls = {
            "roll": lambda: e.roll(name, _int(body, "drop"), body.get("keep"), body.get("strategy"), bool(body.get("boundary"))),
            "mask": lambda: e.mask(name, body.get("messages"), tuple(body["span"]) if body.get("span") else None,
                                   bool(body.get("close_gap")), str(body.get("strategy") or "shift")),
            "compact": lambda: e.compact(name, _int(body, "up_to"), body.get("summary"), body.get("mode", "mask")),
            "prune": lambda: e.prune(name, body.get("kind", "tool"), int(body.get("keep_last", 1))),
            "erratum": lambda: e.erratum(name, str(body.get("text", ""))),
            "fork": lambda: {"session": e.fork(name, body.get("name"))},
            "save": lambda: e.save(name, body.get("path")),
            "strategy": lambda: (e.set_roll_strategy(name, str(body.get("strategy", ""))), {"strategy": body.get("strategy")})[1],
            "attach": lambda: e.attach(name, str(body.get("document", "")), int(body.get("recompute", 0)),
                                       body.get("strategy")),
        }
        if edit not in calls:
            raise HTTPException(404, f"unknown edit {edit!r} (one of: {', '.join(calls)})")
        try:
            return JSONResponse(await run_in_threadpool(calls[edit]))
        except (TypeError, ValueError) as exc:
            raise InvalidRequest(f"bad arguments for {edit}: {exc}") from None

    async def restore_session(self, request: HTTPRequest) -> JSONResponse:
        self._auth(request)
        body = await self._json(request)
        if not isinstance(body, dict) or not isinstance(body.get("path"), str):
            raise InvalidRequest("restore needs a 'path'", param="path")
        name = await run_in_threadpool(self.engine.restore, body["path"], body.get("name"))
        return JSONResponse({"session": name})


def _int(body: dict, key: str) -> int:
    value = body.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidRequest(f"'{key}' must be an integer", param=key)
    return value


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def fim_tokens(core, prefix: str, suffix: str) -> list[int]:
    """prefix/suffix/middle special tokens around the two texts; models without FIM tokens say so."""
    from kvside._llama import lib

    vocab = core.model.vocab
    ids = [lib.llama_vocab_fim_pre(vocab), lib.llama_vocab_fim_suf(vocab), lib.llama_vocab_fim_mid(vocab)]
    if min(ids) < 0:
        raise InvalidRequest(f"{core.model_name} has no fill-in-the-middle tokens; 'suffix' is not supported",
                             param="suffix")
    pre, suf, mid = ids
    text = lambda t: core.model.tokenize(t, add_special=False, parse_special=False)  # noqa: E731
    head = [core.model.bos] if core.model.add_bos else []
    return head + [pre] + text(prefix) + [suf] + text(suffix) + [mid]
