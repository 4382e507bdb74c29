"""Anthropic's Messages API (`POST /v1/messages`, as Claude Code and the `anthropic` client send it),
over the same binding as /v1/chat/completions: content blocks become chat messages, and the reply
comes back as thinking, text and tool_use blocks, streamed as Anthropic's events. Vocabulary:
Anthropic's words here (blocks, tool_use, stop_reason).

Usage is counted as Anthropic counts it: `input_tokens` are the prompt's tokens that were read,
`cache_read_input_tokens` those already in the cache. kvside never needs `cache_control` marks to
reuse a prompt (every session is a cache); they are accepted and have no effect."""

from __future__ import annotations

import asyncio
import json
import uuid

from sse_starlette.sse import ServerSentEvent
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse
from starlette.routing import Route

from kvside.errors import InvalidRequest
from kvside.server import llamacpp_api as llamacpp
from kvside.server import openai_api as oa

# tool types Anthropic defines (server tools it runs, and client tools whose schema only Claude
# knows): left out of the prompt, and the reply says so
_TYPED_TOOL_PREFIXES = ("web_search", "web_fetch", "code_execution", "bash", "text_editor", "computer", "memory",
                        "tool_search", "mcp")

# Anthropic's error types by HTTP status
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error",
               529: "overloaded_error"}


def error_body(status: int, message: str) -> dict:
    return {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message}}


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


# -- request: blocks to messages --------------------------------------------------------------------
def _blocks(content, where: str) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise InvalidRequest("content must be a string or a list of blocks", param=where)
    for j, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise InvalidRequest("each content block must be an object with a 'type'", param=f"{where}[{j}]")
    return content


def _text_of(block: dict, where: str) -> str:
    if not isinstance(block.get("text"), str):
        raise InvalidRequest("a text block needs a string 'text'", param=where)
    return block["text"]


def _result_text(content, where: str) -> str:
    """A tool_result's content: a string, or text blocks."""
    if content is None:
        return ""
    out = []
    for j, block in enumerate(_blocks(content, where)):
        if block["type"] != "text":
            raise InvalidRequest(f"this model reads text only: an {block['type']!r} block cannot be given to it",
                                 param=f"{where}[{j}]")
        out.append(_text_of(block, f"{where}[{j}]"))
    return "".join(out)


def to_messages(system, messages) -> list[dict]:
    """Anthropic's system and messages as chat messages. A user turn's tool_result blocks become
    tool messages (first, as they answer the calls just before); an assistant turn's thinking,
    text and tool_use blocks become one assistant message."""
    out: list[dict] = []
    if system is not None:
        if isinstance(system, list):
            texts = [_text_of(b, f"system[{j}]") for j, b in enumerate(_blocks(system, "system"))]
            text = "\n\n".join(t for t in map(oa.without_billing_line, texts) if t)
        elif isinstance(system, str):
            text = oa.without_billing_line(system)
        else:
            raise InvalidRequest("'system' must be a string or a list of text blocks", param="system")
        if text:
            out.append({"role": "system", "content": text})
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty list", param="messages")
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant", "system"):
            raise InvalidRequest("each message needs the role 'user', 'assistant' or 'system'", param=f"{where}.role")
        blocks = _blocks(m.get("content"), f"{where}.content")
        if m["role"] == "system":  # Claude Code puts system text between the turns too
            out.append({"role": "system", "content": "".join(
                _text_of(b, f"{where}.content[{j}]") for j, b in enumerate(blocks))})
        elif m["role"] == "user":
            texts, results = [], []
            for j, b in enumerate(blocks):
                at = f"{where}.content[{j}]"
                if b["type"] == "text":
                    texts.append(_text_of(b, at))
                elif b["type"] == "tool_result":
                    if not isinstance(b.get("tool_use_id"), str):
                        raise InvalidRequest("a tool_result needs its 'tool_use_id'", param=at)
                    results.append({"role": "tool", "tool_call_id": b["tool_use_id"],
                                    "content": _result_text(b.get("content"), f"{at}.content")})
                else:
                    raise InvalidRequest(f"this model reads text only: an {b['type']!r} block cannot be given to it"
                                         if b["type"] in ("image", "document") else
                                         f"a user turn's blocks are text and tool_result, not {b['type']!r}", param=at)
            out += results
            if texts or not results:
                out.append({"role": "user", "content": "".join(texts)})
        else:
            turn: dict = {"role": "assistant", "content": ""}
            for j, b in enumerate(blocks):
                at = f"{where}.content[{j}]"
                if b["type"] == "text":
                    turn["content"] += _text_of(b, at)
                elif b["type"] == "thinking":
                    if isinstance(b.get("thinking"), str) and b["thinking"]:
                        turn["reasoning_content"] = turn.get("reasoning_content", "") + b["thinking"]
                elif b["type"] == "redacted_thinking":
                    continue  # Anthropic's ciphertext: nothing another model can read
                elif b["type"] == "tool_use":
                    if not isinstance(b.get("id"), str) or not isinstance(b.get("name"), str):
                        raise InvalidRequest("a tool_use block needs an 'id' and a 'name'", param=at)
                    args = b.get("input", {})
                    turn.setdefault("tool_calls", []).append({"id": b["id"], "type": "function", "function": {
                        "name": b["name"], "arguments": json.dumps(args, ensure_ascii=False)}})
                else:
                    raise InvalidRequest(f"an assistant turn's blocks are text, thinking and tool_use, not "
                                         f"{b['type']!r}", param=at)
            out.append(turn)
    return out


def _tools(tools, choice) -> tuple[list[dict], list[str], object, bool]:
    """Anthropic's tools as chat tools, the typed ones left out, tool_choice in chat's shape, and
    whether calls may come in parallel."""
    if tools is None:
        tools = []
    if not isinstance(tools, list):
        raise InvalidRequest("'tools' must be a list", param="tools")
    out, ignored = [], []
    for i, t in enumerate(tools):
        kind = t.get("type") if isinstance(t, dict) else None
        if isinstance(kind, str) and kind != "custom":
            if kind.startswith(_TYPED_TOOL_PREFIXES):
                ignored.append(kind)
                continue
            raise InvalidRequest(f"unknown tool type {kind!r}", param=f"tools[{i}].type")
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise InvalidRequest("each tool needs a 'name' and an 'input_schema'", param=f"tools[{i}]")
        schema = t.get("input_schema", {"type": "object"})
        if not isinstance(schema, dict):
            raise InvalidRequest("'input_schema' must be a JSON schema object", param=f"tools[{i}].input_schema")
        fn = {"name": t["name"], "parameters": schema}
        if isinstance(t.get("description"), str):
            fn["description"] = t["description"]
        out.append({"type": "function", "function": fn})
    parallel = True
    if choice is None:
        return out, ignored, None, parallel
    if not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "tool", "none"):
        raise InvalidRequest("tool_choice must be {'type': 'auto' | 'any' | 'tool' | 'none'}", param="tool_choice")
    parallel = not choice.get("disable_parallel_tool_use", False)
    kind = choice["type"]
    if kind == "tool":
        if not isinstance(choice.get("name"), str):
            raise InvalidRequest("tool_choice {'type': 'tool'} needs the tool's 'name'", param="tool_choice.name")
        return out, ignored, {"type": "function", "function": {"name": choice["name"]}}, parallel
    return out, ignored, {"auto": "auto", "any": "required", "none": "none"}[kind], parallel


def parse(body) -> tuple[oa.Request, list[str], bool]:
    """The chat request of a Messages request, the tool types left out, and whether it streams."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise InvalidRequest("'max_tokens' is required: a positive integer", param="max_tokens")
    tools, ignored, choice, parallel = _tools(body.get("tools"), body.get("tool_choice"))
    chat = {"messages": to_messages(body.get("system"), body.get("messages")), "max_tokens": max_tokens,
            "stream": body.get("stream", False)}
    for name in ("model", "temperature", "top_p", "top_k", "session"):
        if body.get(name) is not None:
            chat[name] = body[name]
    stops = body.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(x, str) and x for x in stops):
            raise InvalidRequest("'stop_sequences' must be a list of strings", param="stop_sequences")
        chat["stop"] = stops
    fmt = (body.get("output_config") or {}).get("format") if isinstance(body.get("output_config"), dict) else None
    if fmt is not None:  # structured output: {"type": "json_schema", "schema": {...}}
        if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
            raise InvalidRequest("output_config.format must be {'type': 'json_schema', 'schema': {...}}",
                                 param="output_config.format")
        chat["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}
    if tools:
        chat["tools"] = tools
        chat["parallel_tool_calls"] = parallel
        if choice is not None:
            chat["tool_choice"] = choice
    elif choice not in (None, "auto", "none"):
        raise InvalidRequest("tool_choice needs tools", param="tool_choice")
    return oa.parse_chat(chat), ignored, chat["stream"]


# -- response: a reply as blocks --------------------------------------------------------------------
def _input(arguments: str):
    try:
        value = json.loads(arguments)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def content_blocks(done) -> list[dict]:
    out = []
    if done.reasoning:
        out.append({"type": "thinking", "thinking": done.reasoning, "signature": ""})
    if done.text:
        out.append({"type": "text", "text": done.text})
    out += [{"type": "tool_use", "id": c["id"], "name": c["function"]["name"], "input": _input(c["function"]["arguments"])}
            for c in done.tool_calls]
    return out


def stop_reason(done) -> str:
    if done.tool_calls:
        return "tool_use"
    return "max_tokens" if done.finish_reason == "length" else "end_turn"


def usage(u) -> dict:
    """Anthropic's counts: the prompt's tokens read, and those read from the cache, apart."""
    return {"input_tokens": u.prompt_tokens - u.cached_tokens, "cache_read_input_tokens": u.cached_tokens,
            "cache_creation_input_tokens": 0, "output_tokens": u.completion_tokens}


class BlockWriter:
    """Anthropic's stream events from the engine's: message_start once the prompt is read (its
    usage is known then), a block per kind as it begins (thinking, text, each tool_use), closed
    when another begins."""

    def __init__(self, mid: str, model: str, stream):
        self.mid, self.model, self.stream = mid, model, stream
        self.started = False
        self.index = -1
        self.open: str | None = None

    @staticmethod
    def event(kind: str, **data) -> ServerSentEvent:
        return ServerSentEvent(data=json.dumps({"type": kind, **data}, ensure_ascii=False), event=kind)

    def start(self) -> list[ServerSentEvent]:
        if self.started:
            return []
        self.started = True
        u = usage(self.stream.usage) if self.stream.usage is not None else usage(_NoUsage)
        u["output_tokens"] = 0
        return [self.event("message_start", message={"id": self.mid, "type": "message", "role": "assistant",
                                                     "model": self.model, "content": [], "stop_reason": None,
                                                     "stop_sequence": None, "usage": u})]

    def _open(self, kind: str, block: dict) -> list[ServerSentEvent]:
        out = self.close()
        self.index += 1
        self.open = kind
        return out + [self.event("content_block_start", index=self.index, content_block=block)]

    def close(self) -> list[ServerSentEvent]:
        if self.open is None:
            return []
        self.open = None
        return [self.event("content_block_stop", index=self.index)]

    def feed(self, ev) -> list[ServerSentEvent]:
        out = self.start()
        if ev.kind == "reasoning":
            if self.open != "thinking":
                out += self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            out.append(self.event("content_block_delta", index=self.index,
                                  delta={"type": "thinking_delta", "thinking": ev.text}))
        elif ev.kind == "text":
            if self.open != "text":
                out += self._open("text", {"type": "text", "text": ""})
            out.append(self.event("content_block_delta", index=self.index, delta={"type": "text_delta", "text": ev.text}))
        elif ev.kind == "tool_call":
            out += self._open("tool_use", {"type": "tool_use", "id": ev.data["id"], "name": ev.data["name"], "input": {}})
        elif ev.kind == "tool_args" and self.open == "tool_use":
            out.append(self.event("content_block_delta", index=self.index,
                                  delta={"type": "input_json_delta", "partial_json": ev.text}))
        return out

    def finish(self, done) -> list[ServerSentEvent]:
        out = self.start() + self.close()
        return out + [self.event("message_delta", delta={"stop_reason": stop_reason(done), "stop_sequence": None},
                                 usage=usage(done.usage)),
                      self.event("message_stop")]


class _NoUsage:
    prompt_tokens = cached_tokens = completion_tokens = 0


class AnthropicFront:
    """The handlers of /v1/messages, over the daemon's admission, binding and streaming."""

    def __init__(self, daemon):
        self.d = daemon

    def routes(self) -> list[Route]:
        return [Route("/v1/messages", self.create, methods=["POST"]),
                Route("/v1/messages/count_tokens", self.count_tokens, methods=["POST"])]

    async def count_tokens(self, request: HTTPRequest) -> JSONResponse:
        """The prompt's tokens as a fresh session would read them. max_tokens is not needed here."""
        body = await self.d._json(request)
        if isinstance(body, dict):
            body = dict(body, max_tokens=1)
        req, _, _ = parse(body)
        _, engine = await self.d.engine_for(req.model)
        count = await asyncio.to_thread(engine.call,
                                        lambda core: llamacpp.prompt_token_count(core, req.messages, req.reply.tools))
        return JSONResponse({"input_tokens": count})

    async def create(self, request: HTTPRequest):
        req, ignored, streaming = parse(await self.d._json(request))
        req.served, engine = await self.d.engine_for(req.model)
        explicit = self.d._explicit(request, req)
        stream, queue, note, first = await self.d._start(request, streaming, lambda on_event: engine.bind_chat(
            req.messages, session=explicit, reuse=self.d.reuse, on_event=on_event, reply=req.reply,
            **req.params), engine, explicit)
        mid = new_id("msg")
        headers = {"X-Kvside-Session": note["session"]}
        extra = {k: v for k, v in (("tools_ignored", ignored),) if v}
        if streaming:
            return self.d._sse(self._events(stream, queue, first, mid, req.served, note), headers)
        try:
            done = await self.d._collect(request, stream, queue, note)
        finally:
            self.d._done()
        return JSONResponse({"id": mid, "type": "message", "role": "assistant", "model": req.served,
                             "content": content_blocks(done), "stop_reason": stop_reason(done), "stop_sequence": None,
                             "usage": usage(done.usage), "kvside": {"notices": done.notices, **note, **extra}},
                            headers=headers)

    async def _events(self, stream, queue, first, mid: str, model: str, note: dict):
        writer = BlockWriter(mid, model, stream)
        try:
            async for event in self.d._events(queue, first):
                if event.kind == "error":
                    err = event.data["error"]
                    yield writer.event("error", error=error_body(err.status, err.message)["error"])
                    break
                if event.kind == "done":
                    done = stream.completion
                    self.d.replied(done, note)
                    for out in writer.finish(done):
                        yield out
                elif event.kind != "notice":
                    for out in writer.feed(event):
                        yield out
        finally:
            self.d._stream_ended(stream)


def is_anthropic(path: str) -> bool:
    return path.startswith("/v1/messages")

