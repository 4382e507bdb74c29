"""The HTTP daemon: OpenAI-compatible endpoints, /health and /metrics, and kvside's own session and
edit endpoints; Ollama's front (ollama_api.py), llama-server's (llamacpp_api.py), OpenAI's
Responses API (responses_api.py) and Anthropic's Messages API (anthropic_api.py) add their routes
and use the same plumbing. Every request passes the Guard first (Host, Origin, API key, body type).
Handlers never let an exception through: every failure becomes an error in the shape the
request's API uses, with a fitting status, and the daemon keeps serving.

Over HTTP, sessions are named, never pathed: session files are resolved under the daemon's
sessions folder by name. Export and import of files anywhere is the command line's job
(`kvside save NAME FILE`, `kvside restore FILE`), which moves the bytes over
GET/PUT /kvside/sessions/{name}/file."""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from pathlib import Path
from typing import Any, AsyncIterator

from sse_starlette.sse import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HTTPRequest
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from kvside.engine import Engine, commands, persist, prompt
from kvside.engine.fleet import HANDOVER_S, SessionElsewhere
from kvside.engine.session import check_name
from kvside.errors import EngineClosed, InvalidRequest, KvsideError, ModelNotFound
from kvside.server import accesslog
from kvside.server import anthropic_api as anthropic
from kvside.server import llamacpp_api as llamacpp
from kvside.server import ollama_api as ollama
from kvside.server import openai_api as oa
from kvside.server import responses_api
from kvside.server.accesslog import RequestLog
from kvside.server.guard import Guard
from kvside.server.metrics import CountRequests, Metrics
from kvside.server.pool import ModelPool

KEEPALIVE_S = 5.0
FILE_SUFFIX = "/file"


class PayloadTooLarge(KvsideError):
    status = 413
    kind = "invalid_request_error"
    code = "payload_too_large"


class Overloaded(KvsideError):
    status = 429
    kind = "rate_limit_error"
    code = "too_many_requests"


def error_response(exc: KvsideError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(exc.to_openai(), status_code=exc.status, headers=headers)


class Daemon:
    def __init__(self, engine: Engine, *, api_key: str | None = None, host: str = "127.0.0.1",
                 allow_hosts: tuple[str, ...] = (), allow_origins: tuple[str, ...] = (),
                 max_body: int = 8 * 1024 * 1024, max_upload: int = 16 << 30, max_active: int = 32,
                 reuse: bool = True, keepalive_s: float = KEEPALIVE_S, pool: ModelPool | None = None):
        self.engine = engine  # the model the daemon started with: sessions, tokenizer and llama-server's endpoints
        # every model a request may name (one, unless --max-models allows more)
        self.pool = pool or ModelPool(engine)
        info = self.info = engine.info()
        self.template = engine.call(llamacpp.template_facts)
        # the embedding model given with --embedding-model, if any (else the chat model embeds)
        self.embedding = engine.call(lambda core: core._embedder.describe() if core._embedder else None)
        self.embedding_aliases = {self.embedding["model"], self.embedding["model"] + ".gguf"} if self.embedding else set()
        self.model_name = info["model_name"]
        self.model_aliases = {self.model_name, "default", os.path.basename(info["model"]["path"])}
        self.max_body = max_body
        self.max_upload = max_upload
        self.max_active = max_active
        self.reuse = reuse
        self.keepalive_s = keepalive_s
        # requests in flight; beyond max_active a request is refused (429). Requests beyond the
        # resident sessions wait in the engine until a session is free (a request's session is
        # busy until the engine has seen it end, which is not when its client went away)
        self.active = 0
        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics_text, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/models", self.models, methods=["GET"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/embeddings", self.embeddings, methods=["POST"]),
            Route("/embeddings", self.embeddings, methods=["POST"]),
            *llamacpp.LlamaServerFront(self).routes(),
            *ollama.OllamaFront(self).routes(),
            *responses_api.ResponsesFront(self, folder=Path(engine.call(lambda core: core.sessions_dir)) /
                                          "responses").routes(),
            *anthropic.AnthropicFront(self).routes(),
            Route("/kvside/sessions", self.list_sessions, methods=["GET"]),
            Route("/kvside/sessions/{name}", self.show_session, methods=["GET"]),
            Route("/kvside/sessions/{name}", self.delete_session, methods=["DELETE"]),
            Route("/kvside/sessions/{name}/file", self.download_session, methods=["GET"]),
            Route("/kvside/sessions/{name}/file", self.upload_session, methods=["PUT"]),
            Route("/kvside/sessions/{name}/{edit}", self.edit_session, methods=["POST"]),
            Route("/kvside/restore", self.restore_session, methods=["POST"]),
        ]
        starlette = Starlette(routes=routes, exception_handlers={
            KvsideError: self._on_error, HTTPException: self._on_http, Exception: self._on_error})
        self.metrics = Metrics()
        self.app = RequestLog(CountRequests(Guard(starlette, api_key=api_key, bind_host=host, allow_hosts=allow_hosts,
                                                  allow_origins=allow_origins, upload_suffixes=(FILE_SUFFIX,)),
                                            self.metrics))

    # -- plumbing -------------------------------------------------------------------------------
    async def _on_error(self, request, exc: Exception) -> JSONResponse:
        if isinstance(exc, ClientDisconnect):
            exc = InvalidRequest("the client went away")
        elif not isinstance(exc, KvsideError):
            exc = KvsideError(f"internal error: {type(exc).__name__}")
        headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
        if request.url.path.startswith("/api/"):  # Ollama's clients read {"error": "..."}
            return JSONResponse({"error": exc.message}, status_code=exc.status, headers=headers)
        if anthropic.is_anthropic(request.url.path):
            return JSONResponse(anthropic.error_body(exc.status, exc.message), status_code=exc.status, headers=headers)
        return error_response(exc, headers)

    async def _on_http(self, request, exc: HTTPException) -> JSONResponse:
        err = KvsideError(exc.detail if isinstance(exc.detail, str) else "error")
        err.status, err.kind = exc.status_code, "invalid_request_error"
        err.code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(err)

    async def _body(self, request: HTTPRequest, limit: int) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"request body over {limit} bytes")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise PayloadTooLarge(f"request body over {limit} bytes")
        return bytes(data)

    async def _json(self, request: HTTPRequest) -> Any:
        try:
            text = (await self._body(request, self.max_body)).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequest("request body is not valid UTF-8") from None
        return parse_json(text)

    async def engine_for(self, model: str | None, keep_alive: float | None = None):
        """(name, engine) of the model a request names, loaded if it is installed and not loaded yet."""
        if model is None or model in self.model_aliases:
            accesslog.note(model=self.model_name)
            return self.model_name, self.engine
        name, engine = await asyncio.to_thread(self.pool.get, model, keep_alive)
        accesslog.note(model=name)
        return name, engine

    def replied(self, done, note: dict | None) -> None:
        """A reply has finished: count it, and log it with its request (--log-requests)."""
        self.metrics.reply(done, note)
        accesslog.replied(done, note)

    def _check_model(self, model: str | None) -> None:
        if model is not None and model not in self.model_aliases:
            raise ModelNotFound(f"model {model!r} is not served here (this daemon serves {self.model_name!r})", param="model")

    def embedding_model(self, model: str | None) -> str:
        """The name an embeddings request is answered under: the embedding model's, or the chat
        model's when the daemon has none."""
        if model is not None and model.endswith(":latest"):
            model = model[: -len(":latest")]
        if model is not None and model not in self.embedding_aliases and model not in self.model_aliases:
            served = [self.embedding["model"]] if self.embedding else []
            raise ModelNotFound(f"model {model!r} is not served here (embeddings: {', '.join(served + [self.model_name])})",
                                param="model")
        return self.embedding["model"] if self.embedding else self.model_name

    async def embed(self, inputs: list, truncate: bool, normalize: bool) -> tuple[list, int]:
        """Vectors of `inputs`, computed on the engine thread (between generation steps)."""
        self._admit()
        try:
            return await asyncio.to_thread(self.engine.call, lambda core: core.embed(inputs, truncate, normalize))
        finally:
            self._done()

    def _admit(self) -> None:
        if self.active >= self.max_active:
            raise Overloaded(f"{self.active} requests in flight; try again shortly")
        self.active += 1

    def _done(self) -> None:
        self.active -= 1

    def _stream_ended(self, stream) -> None:
        """A streamed reply's response has ended. If the client went away before the reply did, its
        generation stops (its session keeps what was written) and the request's log line says so."""
        if not stream.done:
            stream.cancel()
            accesslog.note(finish="client gone")
        self._done()

    @staticmethod
    def _explicit(request: HTTPRequest, req: oa.Request) -> str | None:
        name = request.headers.get("x-kvside-session") or req.session
        return check_name(name) if name else None

    # -- streaming helpers ----------------------------------------------------------------------
    _WHOLE_REPLY_EVENTS = frozenset({"bound", "done", "error"})

    def _pipe(self, streaming: bool = True):
        """The queue the engine's events reach this loop through. A reply sent whole needs only
        its binding and its end: token events are not forwarded, so the loop is not woken once
        per token while the engine's threads decode (on a 2-core machine a woken thread stalls a
        llama_decode that uses both cores)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        if streaming:
            return queue, lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev)
        wanted = self._WHOLE_REPLY_EVENTS
        return queue, lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev) if ev.kind in wanted else None

    async def _wait_for(self, kind: str, request: HTTPRequest, stream, queue: asyncio.Queue):
        """The next event of `kind`, skipping others; an error event is raised. A client that
        goes away meanwhile cancels the generation."""
        while True:
            try:
                event = await asyncio.wait_for(queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    stream.cancel()
                continue
            if event.kind == "error":
                raise event.data["error"]
            if event.kind == kind:
                return event

    async def _bound(self, request: HTTPRequest, stream, queue: asyncio.Queue) -> dict:
        """What the engine bound the request to (the response headers name the session)."""
        return (await self._wait_for("bound", request, stream, queue)).data

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
            event = await queue.get()
            yield event
            if event.kind in ("done", "error"):
                return

    async def _collect(self, request: HTTPRequest, stream, queue, note: dict | None = None) -> Any:
        """A non-streamed reply, whole."""
        await self._wait_for("done", request, stream, queue)
        self.replied(stream.completion, note)
        return stream.completion

    def _sse(self, events, headers: dict) -> EventSourceResponse:
        """Server-sent events, with a keep-alive comment while a long prompt is read."""
        return EventSourceResponse(events, headers=headers, ping=self.keepalive_s, sep="\n",
                                   ping_message_factory=lambda: ServerSentEvent(comment="keep-alive"))

    async def take_over(self, engine: Engine, name: str | None) -> None:
        """With a sessions folder shared by several daemons: when another live daemon has session
        `name` open, ask it to let go (it saves the session after its current reply and evicts
        it) and wait until it has, so this daemon's engine can open the saved file."""
        leases = engine.fleet
        if leases is None or name is None:
            return
        if await asyncio.to_thread(leases.owner_elsewhere, name) is None:
            return
        await asyncio.to_thread(leases.ask, name)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + HANDOVER_S
        while loop.time() < deadline:
            await asyncio.sleep(0.05)
            holder = await asyncio.to_thread(leases.owner_elsewhere, name)
            if holder is None:
                return
        await asyncio.to_thread(leases.withdraw, name)
        raise SessionElsewhere(f"session {name!r} is open on daemon {holder}, which did not let go of it "
                               f"within {HANDOVER_S:.0f} s")

    async def _start(self, request: HTTPRequest, streaming: bool, post, engine: Engine | None = None,
                     session: str | None = None):
        """Admit a request, post its generation and wait for its binding (and, streamed, for its
        first event, so an early error is an HTTP error). Returns (stream, queue, note, first).
        `session`: the session the request names (taken over from another daemon first)."""
        await self.take_over(engine or self.engine, session)
        self._admit()
        stream = None
        try:
            queue, on_event = self._pipe(streaming)
            stream = post(on_event)
            note = await self._bound(request, stream, queue)
            first = await self._first(queue) if streaming else None
        except BaseException:
            if stream is not None:
                stream.cancel()
            self._done()
            raise
        return stream, queue, note, first

    # -- endpoints ------------------------------------------------------------------------------
    async def health(self, request: HTTPRequest) -> JSONResponse:
        return JSONResponse({"status": "ok", "model": self.model_name, "active": self.active})

    async def metrics_text(self, request: HTTPRequest) -> Response:
        models = []
        for name, entry in list(self.pool.loaded.items()):
            try:
                sessions = await asyncio.to_thread(entry.engine.sessions)
                decode_s, costs = await asyncio.to_thread(entry.engine.call, lambda core: (core.decode_seconds,
                                                                                            core.costs.report()))
            except EngineClosed:  # unloaded meanwhile: it has nothing to report any more
                continue
            models.append((name, sessions, decode_s, costs))
        body, content_type = self.metrics.render(self.active, models)
        return Response(body, media_type=content_type)

    async def models(self, request: HTTPRequest) -> JSONResponse:
        data = [{"id": self.model_name, "object": "model", "created": 0, "owned_by": "kvside",
                 "meta": llamacpp.model_meta(self.info)}]
        if self.pool.make_engine is not None:  # the other installed models, loaded on first use
            from kvside.models import available

            for ref in await asyncio.to_thread(available):
                if ref.name != self.model_name:
                    data.append({"id": ref.name, "object": "model", "created": 0, "owned_by": "kvside",
                                 "meta": {"size": ref.size, "loaded": ref.name in self.pool.loaded}})
        if self.embedding:
            data.append({"id": self.embedding["model"], "object": "model", "created": 0, "owned_by": "kvside",
                         "meta": {"n_embd": self.embedding["n_embd"], "n_ctx": self.embedding["n_ctx"],
                                  "pooling": self.embedding["pooling"]}})
        for item in data:  # Anthropic's clients (Claude Code's model picker) read these fields
            item.update(type="model", display_name=item["id"], created_at="1970-01-01T00:00:00Z")
        return JSONResponse({"object": "list", "data": data, "has_more": False,
                             "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None})

    async def chat_completions(self, request: HTTPRequest):
        req = oa.parse_chat(await self._json(request))
        req.served, engine = await self.engine_for(req.model)
        explicit = self._explicit(request, req)
        stream, queue, note, first = await self._start(request, req.stream, lambda on_event: engine.bind_chat(
            req.messages, session=explicit, reuse=self.reuse, documents=req.documents, on_event=on_event,
            reply=req.reply, **req.params), engine, explicit)
        name = note["session"]
        cid = oa.new_id("chatcmpl")
        headers = {"X-Kvside-Session": name}
        if req.stream:
            return self._sse(self._sse_chat(stream, queue, first, cid, req, note), headers)
        try:
            done = await self._collect(request, stream, queue, note)
        finally:
            self._done()
        extra = {"kvside": {"notices": done.notices, **note}}
        body = oa.chat_response(cid, req.served, done, extra)
        body["timings"] = llamacpp.timings(done)
        return JSONResponse(body, headers=headers)

    async def _sse_chat(self, stream, queue, first, cid, req, note: dict):
        model = req.served
        try:
            yield _data(oa.chat_chunk(cid, model, {"role": "assistant", "content": ""}, None))
            async for event in self._events(queue, first):
                delta = oa.delta_for(event)
                if delta is not None:
                    yield _data(oa.chat_chunk(cid, model, delta, None, event.data.get("logprobs")))
                elif event.kind == "notice":
                    yield ServerSentEvent(comment=f"kvside {json.dumps(event.data)}")
                elif event.kind == "error":
                    yield _data(event.data["error"].to_openai())
                    break
                elif event.kind == "done":
                    done = stream.completion
                    self.replied(done, note)
                    last = oa.chat_chunk(cid, model, {}, oa.finish_reason(done.finish_reason))
                    last["timings"] = llamacpp.timings(done)  # as llama-server's last chunk carries them
                    yield _data(last)
                    if req.include_usage:
                        yield _data(oa.usage_chunk(cid, model, oa.usage_of(done, note)))
            yield ServerSentEvent(data="[DONE]")
        finally:
            self._stream_ended(stream)

    async def embeddings(self, request: HTTPRequest) -> JSONResponse:
        inputs, fmt, dims, model = oa.parse_embeddings(await self._json(request))
        name = self.embedding_model(model)
        n_embd = self.embedding["n_embd"] if self.embedding else self.info["model"]["n_embd"]
        if dims is not None and dims != n_embd:
            raise InvalidRequest(f"this model's embeddings have {n_embd} dimensions", param="dimensions")
        vectors, n_tokens = await self.embed(inputs, truncate=False, normalize=True)
        return JSONResponse(oa.embeddings_response(vectors, fmt, name, n_tokens))

    async def completions(self, request: HTTPRequest):
        req = oa.parse_completion(await self._json(request))
        req.served, engine = await self.engine_for(req.model)
        return await self._text_request(request, req, "text_completion", engine=engine)

    async def _text_request(self, request: HTTPRequest, req: oa.Request, shape: str, tokens=None,
                            warm_up: bool = False, reuse: bool = True, engine=None):
        """A text completion, answered in OpenAI's legacy shape (`shape` "text_completion") or
        llama-server's ("llama": /completion and /infill). `tokens`: the prompt's tokens as a
        function of the core, when the prompt is not req.prompt's text."""
        explicit = self._explicit(request, req)
        if tokens is None and req.suffix is not None:
            tokens = lambda core: prompt.fim_tokens(core, req.prompt, req.suffix)  # noqa: E731
        if tokens is None and not req.prompt:
            raise InvalidRequest("the prompt is empty", param="prompt")
        engine = engine or self.engine
        req.served = req.served or self.model_name
        stream, queue, note, first = await self._start(request, req.stream, lambda on_event: engine.bind_text(
            text=req.prompt, tokens=tokens, session=explicit, on_event=on_event, reply=req.reply,
            reuse=self.reuse and reuse, **req.params), engine, explicit)
        headers = {"X-Kvside-Session": note["session"]}
        cid = oa.new_id("cmpl")
        if req.stream:
            return self._sse(self._sse_text(stream, queue, first, cid, req, shape, note, warm_up), headers)
        try:
            done = await self._collect(request, stream, queue, note)
        finally:
            self._done()
        if shape == "llama":
            return JSONResponse(llamacpp.completion_response(done, req.served, warm_up, oa.binding_facts(note)),
                                headers=headers)
        body = oa.completion_chunk(cid, req.served, done.text, oa.finish_reason(done.finish_reason), done.logprobs)
        body["usage"] = oa.usage_of(done, note)
        return JSONResponse(body, headers=headers)

    async def _sse_text(self, stream, queue, first, cid, req, shape, note: dict, warm_up: bool):
        model = req.served
        try:
            async for event in self._events(queue, first):
                if event.kind == "text":
                    if shape == "llama":
                        if not warm_up:
                            yield _data({"index": 0, "content": event.text, "tokens": [], "stop": False, "id_slot": -1})
                    else:
                        yield _data(oa.completion_chunk(cid, model, event.text, None, event.data.get("logprobs")))
                elif event.kind == "error":
                    yield _data(event.data["error"].to_openai())
                    break
                elif event.kind == "done":
                    done = stream.completion
                    self.replied(done, note)
                    if shape == "llama":  # the last event: the whole response with empty content
                        final = llamacpp.completion_response(done, model, warm_up, oa.binding_facts(note))
                        yield _data(dict(final, content=""))
                    else:
                        yield _data(oa.completion_chunk(cid, model, "", oa.finish_reason(done.finish_reason)))
                        if req.include_usage:
                            yield _data(oa.usage_chunk(cid, model, oa.usage_of(done, note), "text_completion"))
            if shape != "llama":
                yield ServerSentEvent(data="[DONE]")
        finally:
            self._stream_ended(stream)

    # -- kvside's own endpoints -----------------------------------------------------------------
    # Sessions belong to their model: `?model=NAME` picks whose (loaded on demand, as for a chat
    # request); without it, the daemon's first model.
    async def _session_engine(self, request: HTTPRequest, name: str | None = None):
        """The engine of the request's model, with session `name` taken over from another daemon
        if one has it open."""
        model = request.query_params.get("model")
        engine = (await self.engine_for(model or None))[1]
        await self.take_over(engine, name)
        return engine

    async def list_sessions(self, request: HTTPRequest) -> JSONResponse:
        engine = await self._session_engine(request)
        rows = await asyncio.to_thread(engine.sessions)
        return JSONResponse({"sessions": [{k: v for k, v in r.items() if k != "path"} for r in rows]})

    async def show_session(self, request: HTTPRequest) -> JSONResponse:
        name = check_name(request.path_params["name"])
        engine = await self._session_engine(request, name)
        return JSONResponse(await asyncio.to_thread(engine.show, name))

    async def delete_session(self, request: HTTPRequest) -> JSONResponse:
        name = check_name(request.path_params["name"])
        engine = await self._session_engine(request, name)
        await asyncio.to_thread(engine.delete_session, name)
        return JSONResponse({"deleted": name})

    async def edit_session(self, request: HTTPRequest) -> JSONResponse:
        name = check_name(request.path_params["name"])
        edit = request.path_params["edit"]
        if edit not in commands.EDITS:
            raise HTTPException(404, f"unknown edit {edit!r} (one of: {', '.join(commands.EDITS)})")
        body = await self._json(request)
        engine = await self._session_engine(request, name)
        result = await asyncio.to_thread(commands.apply, engine, name, edit, body)
        if edit not in commands.MEASUREMENTS:
            self.metrics.edit(edit, result)
        return JSONResponse(result)

    async def restore_session(self, request: HTTPRequest) -> JSONResponse:
        body = await self._json(request)
        if not isinstance(body, dict):
            raise InvalidRequest("the request body must be a JSON object")
        if "path" in body:
            raise InvalidRequest("the daemon restores saved sessions by name ('session'), never from a path; "
                                 "load a file with `kvside restore FILE`", param="path")
        source, new = body.get("session"), body.get("name")
        if not isinstance(source, str) or (new is not None and not isinstance(new, str)):
            raise InvalidRequest("restore needs 'session': the name of a saved session (and an optional 'name')",
                                 param="session")
        engine = await self._session_engine(request, check_name(new or source))
        name = await asyncio.to_thread(engine.restore_named, check_name(source), check_name(new) if new else None)
        return JSONResponse({"session": name})

    async def download_session(self, request: HTTPRequest) -> FileResponse:
        """The session's file: a fresh save of a resident session, or the saved one."""
        name = check_name(request.path_params["name"])
        engine = await self._session_engine(request, name)
        path = await asyncio.to_thread(engine.session_file, name)
        return FileResponse(path, media_type="application/octet-stream", filename=path.name)

    async def upload_session(self, request: HTTPRequest) -> JSONResponse:
        """Load a session file sent as the body (application/octet-stream) as session {name}. The
        bytes go to a temporary file in the sessions folder, are checked in full by the restore,
        and the temporary file goes away whatever happens."""
        name = check_name(request.path_params["name"])
        engine = await self._session_engine(request, name)
        folder = Path(await asyncio.to_thread(engine.call, lambda core: core.sessions_dir))
        fd, tmp = tempfile.mkstemp(prefix=persist.UPLOAD_PREFIX, suffix=persist.SUFFIX, dir=folder)
        try:
            size = 0
            with os.fdopen(fd, "wb") as f:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > self.max_upload:
                        raise PayloadTooLarge(f"session file over {self.max_upload} bytes")
                    f.write(chunk)
            if size == 0:
                raise InvalidRequest("the body must be a session file")
            restored = await asyncio.to_thread(engine.restore, tmp, name)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return JSONResponse({"session": restored, "bytes": size})


def parse_json(text: str) -> Any:
    """A request body as JSON, or a 400 saying why not. Deep nesting, huge integers and the
    NaN/Infinity literals Python would accept are all refused."""
    if not text.strip():
        return {}
    try:
        body = json.loads(text, parse_constant=_refuse_constant)
        json.dumps(body, ensure_ascii=False).encode("utf-8")  # lone surrogates from \ud800-style escapes
        return body
    except UnicodeEncodeError:
        raise InvalidRequest("request body has an unpaired UTF-16 surrogate escape") from None
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc.msg}") from None
    except RecursionError:
        raise InvalidRequest("request body is nested too deeply") from None
    except ValueError as exc:  # an integer of thousands of digits
        raise InvalidRequest(f"request body has a value out of range: {exc}") from None


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _data(obj: dict) -> ServerSentEvent:
    return ServerSentEvent(data=json.dumps(obj, ensure_ascii=False))
