"""OpenAI request parsing and response shapes. Vocabulary: OpenAI words here, engine words in the
engine; this module is where one becomes the other."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

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
            if not isinstance(part, dict) or part.get("type") not in ("text", "input_text"):
                raise InvalidRequest("only text content parts are supported", param=f"messages[{index}].content")
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
        if role not in ("system", "user", "assistant", "tool"):
            raise InvalidRequest(f"unsupported role {role!r}", param=f"messages[{i}].role")
        out.append({"role": role, "content": _content_text(m.get("content"), i)})
    docs = body.get("documents") or []
    if not isinstance(docs, list) or not all(isinstance(d, str) for d in docs):
        raise InvalidRequest("'documents' must be a list of names", param="documents")
    return Request(model, stream, usage, params, session, messages=out, documents=docs)


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
    return Request(model, stream, usage, params, session, prompt=prompt, suffix=suffix)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def chat_chunk(cid: str, model: str, delta: dict, finish: str | None) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def usage_chunk(cid: str, model: str, usage: dict, obj: str = "chat.completion.chunk") -> dict:
    return {"id": cid, "object": obj, "created": int(time.time()), "model": model, "choices": [], "usage": usage}


def chat_response(cid: str, model: str, text: str, finish: str, usage: dict, extra: dict) -> dict:
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish}],
            "usage": usage, **extra}


def completion_chunk(cid: str, model: str, text: str, finish: str | None) -> dict:
    return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}


def finish_reason(reason: str) -> str:
    return "stop" if reason in ("stop", "cancelled") else "length"
