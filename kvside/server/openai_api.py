"""OpenAI request parsing and response shapes. Vocabulary: OpenAI words here, engine words in the
engine; this module is where one becomes the other."""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from kvside.engine.reply import ReplySpec, check_choice
from kvside.engine.toolcalls import check_tools
from kvside.errors import InvalidRequest

_SAMPLING_FIELDS = {
    "temperature": (int, float),
    "top_p": (int, float),
    "top_k": (int,),
    "min_p": (int, float),
    "seed": (int,),
    "repeat_penalty": (int, float),
    "frequency_penalty": (int, float),
    "presence_penalty": (int, float),
}


@dataclass
class Request:
    model: str | None
    stream: bool
    include_usage: bool
    params: dict
    session: str | None
    messages: list[dict] = field(default_factory=list)
    prompt: str = ""
    suffix: str | None = None
    documents: list[str] = field(default_factory=list)
    reply: ReplySpec | None = None
    served: str = ""  # the name of the model that answers (the daemon fills it in)


def _typed(body: dict, name: str, types: tuple, default=None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in types:
        raise InvalidRequest(f"'{name}' must be a number", param=name)
    if not isinstance(value, types):
        raise InvalidRequest(f"'{name}' has the wrong type", param=name)
    return value


def _content_text(content, index: int) -> str:
    """OpenAI content: a string, or a list of parts of which text parts are kept."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("image_url", "input_image", "image", "input_audio", "file"):
                raise InvalidRequest(f"this model reads text only: a '{kind}' content part cannot be given to it",
                                     param=f"messages[{index}].content")
            if kind not in ("text", "input_text", "output_text", "refusal"):
                raise InvalidRequest("only text content parts are supported", param=f"messages[{index}].content")
            if kind == "refusal":
                part = {"text": part.get("refusal")}
            if not isinstance(part.get("text"), str):
                raise InvalidRequest("a text part needs a string 'text'", param=f"messages[{index}].content")
            parts.append(part["text"])
        return "".join(parts)
    raise InvalidRequest("message content must be a string or a list of parts", param=f"messages[{index}].content")


def _common(body: dict) -> tuple[dict, bool, bool, str | None, str | None]:
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    params: dict = {}
    for name, types in _SAMPLING_FIELDS.items():
        value = _typed(body, name, types)
        if value is not None:
            params[name] = value
    ignore_eos = body.get("ignore_eos")  # llama-server's: keep generating past end-of-generation (benchmarks)
    if ignore_eos is not None:
        if not isinstance(ignore_eos, bool):
            raise InvalidRequest("'ignore_eos' must be true or false", param="ignore_eos")
        params["ignore_eos"] = ignore_eos
    max_tokens = _typed(body, "max_completion_tokens", (int,)) or _typed(body, "max_tokens", (int,))
    if max_tokens is not None:
        if max_tokens < 1:
            raise InvalidRequest("'max_tokens' must be >= 1", param="max_tokens")
        params["max_tokens"] = max_tokens
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise InvalidRequest("'stop' must be a string or a list of strings", param="stop")
        params["stop"] = stop
    n = body.get("n", 1)
    if n != 1:
        raise InvalidRequest("only n=1 is supported", param="n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be a boolean", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise InvalidRequest("'stream_options' must be an object", param="stream_options")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidRequest("'model' must be a string", param="model")
    session = body.get("session")
    if session is not None and not isinstance(session, str):
        raise InvalidRequest("'session' must be a string", param="session")
    return params, stream, bool(options.get("include_usage")), model, session


# Claude Code puts a billing line first in its system prompt, with a hash that changes on every
# request: "x-anthropic-billing-header: cc_version=2.1.197.417; cc_entrypoint=cli; cch=...;".
# Anthropic's API reads it as a header, not as prompt; left in the prompt, it changed every request's
# first tokens, and the 18k tokens of system prompt and tools behind them were read again. Proxies
# that carry Claude Code to the chat API (claude-code-router) pass it in the first system message.
_BILLING_LINE = re.compile(r"^x-anthropic-billing-header:[^\n]*(?:\n|$)", re.M)


def without_billing_line(text: str) -> str:
    return _BILLING_LINE.sub("", text)


def parse_chat(body: dict) -> Request:
    params, stream, usage, model, session = _common(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidRequest("each message must be an object", param=f"messages[{i}]")
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role == "function":  # OpenAI's legacy name for a tool result
            role = "tool"
        if role not in ("system", "user", "assistant", "tool"):
            raise InvalidRequest(f"unsupported role {role!r}", param=f"messages[{i}].role")
        msg = {"role": role, "content": _content_text(m.get("content"), i)}
        if i == 0 and role == "system":
            msg["content"] = without_billing_line(msg["content"])
        if role == "assistant":
            calls = _history_calls(m.get("tool_calls"), i)
            if calls:
                msg["tool_calls"] = calls
            reasoning = m.get("reasoning_content", m.get("reasoning"))
            if isinstance(reasoning, str) and reasoning:
                msg["reasoning_content"] = reasoning
        if role == "tool":
            call_id = m.get("tool_call_id")
            if call_id is not None and not isinstance(call_id, str):
                raise InvalidRequest("'tool_call_id' must be a string", param=f"messages[{i}].tool_call_id")
            msg["tool_call_id"] = call_id or ""
        out.append(msg)
    docs = body.get("documents") or []
    if not isinstance(docs, list) or not all(isinstance(d, str) for d in docs):
        raise InvalidRequest("'documents' must be a list of names", param="documents")
    return Request(model, stream, usage, params, session, messages=out, documents=docs, reply=_reply_spec(body))


def _history_calls(calls, index: int) -> list[dict]:
    """An assistant turn's tool_calls as a client resends them (arguments as a JSON string)."""
    if calls is None:
        return []
    where = f"messages[{index}].tool_calls"
    if not isinstance(calls, list):
        raise InvalidRequest("'tool_calls' must be a list", param=where)
    out = []
    for c in calls:
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise InvalidRequest("each tool call needs function.name", param=where)
        args = fn.get("arguments", "{}")
        if not isinstance(args, str):
            args = json.dumps(args, ensure_ascii=False)
        out.append({"id": str(c.get("id") or ""), "type": "function", "function": {"name": fn["name"], "arguments": args}})
    return out


def _reply_spec(body: dict) -> ReplySpec:
    """tools, tool_choice, parallel_tool_calls, response_format, logprobs, top_logprobs.
    reasoning_effort is accepted: reasoning is the model's and the template's to switch."""
    tools = check_tools(body["tools"]) if body.get("tools") else []
    choice = check_choice(body.get("tool_choice"), tools)
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise InvalidRequest("'parallel_tool_calls' must be a boolean", param="parallel_tool_calls")
    spec = ReplySpec(tools=tools, tool_choice=choice, parallel=parallel,
                     response_format=_response_format(body.get("response_format")))
    spec.logprobs, spec.top_logprobs = _logprobs(body)
    return spec


def _response_format(fmt) -> dict | None:
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise InvalidRequest("response_format must be {'type': 'text' | 'json_object' | 'json_schema', ...}",
                             param="response_format")
    if fmt["type"] == "text":
        return None
    if fmt["type"] == "json_object":
        return {"type": "json_object"}
    spec = fmt.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise InvalidRequest("json_schema needs {'name': ..., 'schema': {...}}", param="response_format.json_schema")
    return {"type": "json_schema", "schema": schema, "strict": bool(spec.get("strict"))}


def _logprobs(body: dict, completion: bool = False) -> tuple[bool, int]:
    """Chat: logprobs (bool) + top_logprobs (0-20). Completions: logprobs (int 0-5) is the top count."""
    value = body.get("logprobs")
    if completion:
        if value is None or value is False:
            return False, 0
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 5:
            raise InvalidRequest("'logprobs' must be an integer from 0 to 5", param="logprobs")
        return True, value
    if value is not None and not isinstance(value, bool):
        raise InvalidRequest("'logprobs' must be a boolean", param="logprobs")
    top = body.get("top_logprobs")
    if top is not None:
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20:
            raise InvalidRequest("'top_logprobs' must be an integer from 0 to 20", param="top_logprobs")
        if not value:
            raise InvalidRequest("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    return bool(value), top or 0


def parse_completion(body: dict) -> Request:
    params, stream, usage, model, session = _common(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise InvalidRequest("'prompt' must be a string", param="prompt")
    suffix = body.get("suffix")
    if suffix is not None and not isinstance(suffix, str):
        raise InvalidRequest("'suffix' must be a string", param="suffix")
    spec = ReplySpec()
    spec.logprobs, spec.top_logprobs = _logprobs(body, completion=True)
    return Request(model, stream, usage, params, session, prompt=prompt, suffix=suffix, reply=spec)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def chat_chunk(cid: str, model: str, delta: dict, finish: str | None, logprobs: list | None = None) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": {"content": logprobs} if logprobs else None,
                         "finish_reason": finish}]}


def delta_for(event) -> dict | None:
    """OpenAI's delta for an engine event of a chat reply (None for events that are not one)."""
    if event.kind == "text":
        return {"content": event.text}
    if event.kind == "reasoning":
        return {"reasoning_content": event.text}
    if event.kind == "tool_call":
        d = event.data
        return {"tool_calls": [{"index": d["index"], "id": d["id"], "type": "function",
                                "function": {"name": d["name"], "arguments": ""}}]}
    if event.kind == "tool_args":
        return {"tool_calls": [{"index": event.data["index"], "function": {"arguments": event.text}}]}
    return None


def usage_chunk(cid: str, model: str, usage: dict, obj: str = "chat.completion.chunk") -> dict:
    return {"id": cid, "object": obj, "created": int(time.time()), "model": model, "choices": [], "usage": usage}


# what binding did to the cache for a request, as the `bound` note says it: chat (messages reused,
# dropped, edited in place) and text prompts (prefix kept, runs moved, tokens decoded into holes)
_BINDING_FACTS = ("reused_messages", "dropped_tokens", "edited_messages", "inserted_tokens", "removed_tokens",
                  "prefix_tokens", "moved_tokens", "moved_runs", "recomputed_tokens", "shared_tokens",
                  "moves_declined", "tools_changed", "strategy", "inserted_messages")


def binding_facts(note: dict | None) -> dict:
    return {k: note[k] for k in _BINDING_FACTS if note and k in note}


def usage_of(done, note: dict | None = None) -> dict:
    """OpenAI's usage, with what kvside did to the cache (the edits binding made to match the
    client's history; rolled turns and pruned tool results) under a `kvside` key that clients
    which do not know it ignore."""
    usage = done.usage.to_dict()
    extra = binding_facts(note)
    if done.notices:
        extra["edits"] = [{k: v for k, v in n.items() if k in ("kind", "strategy", "message", "dropped", "masked",
                                                               "pruned_messages")} for n in done.notices]
    if extra:
        usage["kvside"] = extra
    return usage


def chat_response(cid: str, model: str, done, extra: dict) -> dict:
    message = {"role": "assistant", "content": done.text if done.text or not done.tool_calls else None}
    if done.reasoning:
        message["reasoning_content"] = done.reasoning
    if done.tool_calls:
        message["tool_calls"] = done.tool_calls
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message,
                         "logprobs": {"content": done.logprobs} if done.logprobs is not None else None,
                         "finish_reason": finish_reason(done.finish_reason)}],
            "usage": usage_of(done, extra.get("kvside")), **extra}


def completion_chunk(cid: str, model: str, text: str, finish: str | None, logprobs: list | None = None) -> dict:
    return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": completion_logprobs(logprobs),
                         "finish_reason": finish}]}


def completion_logprobs(entries: list | None, offset: int = 0) -> dict | None:
    """The legacy completions shape: tokens, token_logprobs, top_logprobs (dicts), text_offset."""
    if not entries:
        return None
    offsets, at = [], offset
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}


def finish_reason(reason: str) -> str:
    if reason == "tool_calls":
        return "tool_calls"
    return "stop" if reason in ("stop", "cancelled") else "length"


# -- embeddings -------------------------------------------------------------------------------------
MAX_INPUTS = 2048  # as OpenAI's endpoint


def parse_embeddings(body: Any) -> tuple[list, str, int | None, str | None]:
    """POST /v1/embeddings: `input` as a string, strings, token ids or lists of token ids; returns
    (inputs, encoding_format, dimensions, model)."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    value = body.get("input")
    if isinstance(value, str):
        inputs: list = [value]
    elif isinstance(value, list) and value and all(type(t) is int for t in value):
        inputs = [value]
    elif isinstance(value, list) and value and all(
            isinstance(x, str) or (isinstance(x, list) and x and all(type(t) is int for t in x)) for x in value):
        inputs = value
    else:
        raise InvalidRequest("'input' must be a string, a list of strings, a list of token ids or a list of "
                             "such lists, not empty", param="input")
    if len(inputs) > MAX_INPUTS:
        raise InvalidRequest(f"at most {MAX_INPUTS} inputs per request", param="input")
    if any(isinstance(x, str) and not x for x in inputs):
        raise InvalidRequest("an input is an empty string", param="input")
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise InvalidRequest("'encoding_format' must be 'float' or 'base64'", param="encoding_format")
    dims = body.get("dimensions")
    if dims is not None and (type(dims) is not int or dims < 1):
        raise InvalidRequest("'dimensions' must be a positive integer", param="dimensions")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidRequest("'model' must be a string", param="model")
    return inputs, fmt, dims, model


def embeddings_response(vectors: list, fmt: str, model: str, n_tokens: int) -> dict:
    import base64

    import numpy as np

    def encode(v):
        return base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode() if fmt == "base64" else \
            [float(x) for x in v]

    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}
