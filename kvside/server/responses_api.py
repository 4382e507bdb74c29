"""OpenAI's Responses API (`POST /v1/responses`, as Codex, Zed and the openai client's
`responses.create` send it), over the same binding as /v1/chat/completions: input items become
chat messages, and the reply's reasoning, text and calls become output items, streamed as typed
events. Vocabulary: the Responses API's words here (items, output_text, call_id).

A stored response (`store`, true unless the client says otherwise; responses_store.py keeps them)
carries its conversation, so a client that continues with `previous_response_id` sends only what is
new. The cache does not care which way the conversation arrives: either way the messages are the
same, and binding finds the session that holds them."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from sse_starlette.sse import ServerSentEvent
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse
from starlette.routing import Route

from kvside.errors import InvalidRequest
from kvside.server import llamacpp_api as llamacpp
from kvside.server import openai_api as oa
from kvside.server.responses_store import MAX_STORED, ResponseNotFound, ResponseStore, Stored

# a custom (freeform) tool is offered to the model as a function of one string, as Ollama does
CUSTOM_PARAMETERS = {"type": "object", "properties": {"input": {"type": "string"}}, "required": ["input"]}

# tools OpenAI runs, or that only its own models know how to call
HOSTED_TOOLS = frozenset({"web_search", "web_search_preview", "web_search_preview_2025_03_11", "file_search",
                          "code_interpreter", "computer_use", "computer_use_preview", "image_generation", "mcp",
                          "local_shell", "shell", "apply_patch", "tool_search"})

# request fields passed on to the chat request as they are
_PASSED = ("model", "stream", "temperature", "top_p", "top_k", "min_p", "seed", "repeat_penalty",
           "frequency_penalty", "presence_penalty", "parallel_tool_calls", "session", "ignore_eos")


class PreviousNotFound(InvalidRequest):
    code = "previous_response_not_found"


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# -- request: items to messages ---------------------------------------------------------------------
@dataclass
class Parsed:
    chat: oa.Request  # the chat request the engine answers
    new_messages: list[dict]  # what this request added to the previous response's conversation
    input_items: list[dict]
    names: ToolNames
    echo: dict  # request fields the response object repeats
    store: bool
    parent: Stored | None = None


def _text_parts(content, where: str, kinds: tuple[str, ...]) -> str:
    """An item's content: a string, or parts of the given text kinds joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest("content must be a string or a list of parts", param=where)
    out = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_image", "input_file", "input_audio"):
            raise InvalidRequest(f"this model reads text only: an '{kind}' part cannot be given to it",
                                 param=f"{where}[{j}]")
        if kind == "refusal" and isinstance(part.get("refusal"), str):
            out.append(part["refusal"])
            continue
        if kind not in kinds or not isinstance(part.get("text"), str):
            raise InvalidRequest(f"a content part here must be one of {', '.join(kinds)} with a string 'text'",
                                 param=f"{where}[{j}]")
        out.append(part["text"])
    return "".join(out)


def _reasoning_text(item: dict) -> str:
    """A reasoning item sent back: its text, else its summary. encrypted_content is OpenAI's
    ciphertext, meaningless to another model, and is never read."""
    for key in ("content", "summary"):
        parts = item.get(key)
        if isinstance(parts, list):
            text = "".join(p.get("text", "") for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str))
            if text:
                return text
    return ""


def items_to_messages(items: list, names: ToolNames) -> list[dict]:
    """Input items as chat messages. One model turn comes back as [reasoning, message, calls...]:
    they become one assistant message, as the chat endpoint would have held it."""
    messages: list[dict] = []
    reasoning = ""  # a reasoning item waits for the assistant message it belongs to

    def assistant() -> dict:
        nonlocal reasoning
        last = messages[-1] if messages else None
        if last is None or last["role"] != "assistant" or reasoning:
            last = {"role": "assistant", "content": ""}
            messages.append(last)
        if reasoning:
            last["reasoning_content"], reasoning = reasoning, ""
        return last

    def flush() -> None:
        """Reasoning that no text or call followed (a reply cut off while it reasoned): a turn of its own."""
        nonlocal reasoning
        if reasoning:
            messages.append({"role": "assistant", "content": "", "reasoning_content": reasoning})
            reasoning = ""

    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise InvalidRequest("each input item must be an object", param=where)
        kind = item.get("type") or ("message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise InvalidRequest(f"a message's role must be user, system, developer or assistant, not {role!r}",
                                     param=f"{where}.role")
            if role == "assistant":
                text = _text_parts(item.get("content"), f"{where}.content", ("output_text", "input_text", "text"))
                turn = {"role": "assistant", "content": text}
                if reasoning:
                    turn["reasoning_content"], reasoning = reasoning, ""
                messages.append(turn)
            else:
                text = _text_parts(item.get("content"), f"{where}.content", ("input_text", "text"))
                flush()
                messages.append({"role": "system" if role == "developer" else role, "content": text})
        elif kind in ("function_call", "custom_tool_call"):
            call_id, name = item.get("call_id"), item.get("name")
            if not isinstance(call_id, str) or not call_id or not isinstance(name, str) or not name:
                raise InvalidRequest(f"a {kind} needs a string 'call_id' and 'name'", param=where)
            if kind == "function_call":
                args = item.get("arguments", "")
                if not isinstance(args, str):
                    raise InvalidRequest("a function_call's 'arguments' must be a JSON string", param=f"{where}.arguments")
            else:
                if not isinstance(item.get("input"), str):
                    raise InvalidRequest("a custom_tool_call needs a string 'input'", param=f"{where}.input")
                args = json.dumps({"input": item["input"]}, ensure_ascii=False)
            namespace = item.get("namespace")
            if namespace is not None and not isinstance(namespace, str):
                raise InvalidRequest("a call's 'namespace' must be a string", param=f"{where}.namespace")
            turn = assistant()
            turn.setdefault("tool_calls", []).append({"id": call_id, "type": "function", "function": {
                "name": names.flat(name, namespace), "arguments": args or "{}"}})
        elif kind in ("function_call_output", "custom_tool_call_output"):
            call_id = item.get("call_id")
            if not isinstance(call_id, str) or not call_id:
                raise InvalidRequest(f"a {kind} needs a string 'call_id'", param=where)
            if "output" not in item or item["output"] is None:
                raise InvalidRequest(f"a {kind} needs an 'output'", param=f"{where}.output")
            output = _text_parts(item["output"], f"{where}.output", ("input_text", "output_text", "text"))
            flush()
            messages.append({"role": "tool", "tool_call_id": call_id, "content": output})
        elif kind == "reasoning":
            reasoning += _reasoning_text(item)
        elif kind == "item_reference":
            raise InvalidRequest("item references are not looked up here: send the item itself, or continue "
                                 "with 'previous_response_id'", param=where)
        else:
            raise InvalidRequest(f"unknown input item type {kind!r}", param=f"{where}.type")
    flush()
    return messages


@dataclass
class ToolNames:
    """How the request's tools are named to the model: custom (freeform) tools take one string,
    and a namespace's tools are functions named NAMESPACE.NAME (Chat Completions has no groups)."""
    custom: set[str] = field(default_factory=set)
    namespaced: dict[str, tuple[str, str]] = field(default_factory=dict)  # flat name -> (namespace, name)
    ignored: list[str] = field(default_factory=list)  # types of hosted tools the model is not told of

    def flat(self, name: str, namespace: str | None) -> str:
        return f"{namespace}.{name}" if namespace else name

    def item(self, flat: str) -> dict:
        """A call's name fields in an output item."""
        if flat in self.namespaced:
            namespace, name = self.namespaced[flat]
            return {"name": name, "namespace": namespace}
        return {"name": flat}


def _tools(tools, choice) -> tuple[list[dict], ToolNames, object]:
    """Responses tools ({type, name, parameters}) as chat tools, how they are named, and the
    tool_choice in chat's shape. OpenAI's hosted tools (web search, file search, MCP...) and the
    tools its own models are trained on (local_shell, shell, apply_patch as built-ins) are left out
    of the prompt, and the response says so: agents such as Codex offer web search by default, and
    refusing the request would refuse the agent."""
    if tools is None:
        tools = []
    if not isinstance(tools, list):
        raise InvalidRequest("'tools' must be a list", param="tools")
    out, names = [], ToolNames()

    def add(tool, where: str, namespace: str | None = None) -> None:
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind == "namespace" and namespace is None:
            inner = tool.get("tools")
            if not isinstance(tool.get("name"), str) or not tool["name"] or not isinstance(inner, list):
                raise InvalidRequest("a namespace tool needs a 'name' and a list of 'tools'", param=where)
            for j, t in enumerate(inner):
                add(t, f"{where}.tools[{j}]", tool["name"])
            return
        if kind in HOSTED_TOOLS:
            names.ignored.append(kind)
            return
        if kind not in ("function", "custom"):
            raise InvalidRequest(f"unknown tool type {kind!r}: kvside runs 'function', 'custom' and 'namespace' "
                                 f"tools", param=f"{where}.type")
        if not isinstance(tool.get("name"), str):
            raise InvalidRequest("a tool needs a 'name'", param=f"{where}.name")
        flat = names.flat(tool["name"], namespace)
        if namespace:
            names.namespaced[flat] = (namespace, tool["name"])
        fn = {"name": flat}
        if isinstance(tool.get("description"), str):
            fn["description"] = tool["description"]
        if kind == "custom":
            fn["parameters"] = CUSTOM_PARAMETERS
            names.custom.add(flat)
        elif tool.get("parameters") is not None:
            fn["parameters"] = tool["parameters"]
        out.append({"type": "function", "function": fn})

    for i, tool in enumerate(tools):
        add(tool, f"tools[{i}]")
    if isinstance(choice, dict):
        kind = choice.get("type")
        if kind in ("function", "custom"):
            choice = {"type": "function", "function": {"name": names.flat(choice.get("name"), choice.get("namespace"))}}
        elif kind == "allowed_tools":  # {mode, tools: [{type, name}]}: only these, as auto or required
            allowed = {names.flat(t.get("name"), t.get("namespace")) for t in choice.get("tools") or []
                       if isinstance(t, dict)}
            out = [t for t in out if t["function"]["name"] in allowed]
            choice = choice.get("mode", "auto")
            if choice not in ("auto", "required"):
                raise InvalidRequest("allowed_tools' mode must be 'auto' or 'required'", param="tool_choice.mode")
        else:
            raise InvalidRequest("tool_choice must be 'auto', 'none', 'required', {'type': 'function', 'name': ...} "
                                 "or {'type': 'allowed_tools', ...}", param="tool_choice")
    return out, names, choice


def _text_format(text) -> dict | None:
    """`text.format` as chat's response_format."""
    if text is None:
        return None
    if not isinstance(text, dict):
        raise InvalidRequest("'text' must be an object: {'format': {...}, 'verbosity': ...}", param="text")
    fmt = text.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise InvalidRequest("text.format must be {'type': 'text' | 'json_object' | 'json_schema', ...}",
                             param="text.format")
    if fmt["type"] == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise InvalidRequest("a json_schema format needs its 'schema' object", param="text.format.schema")
        return {"type": "json_schema", "json_schema": {"name": fmt.get("name", "output"), "schema": fmt["schema"],
                                                       "strict": bool(fmt.get("strict"))}}
    return {"type": fmt["type"]}


def parse(body, store: ResponseStore) -> Parsed:
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    if body.get("background"):
        raise InvalidRequest("background responses are not supported: stream instead", param="background")
    if body.get("conversation") is not None:
        raise InvalidRequest("conversations are not kept here: continue with 'previous_response_id'",
                             param="conversation")
    if body.get("prompt") is not None:
        raise InvalidRequest("prompt templates live on OpenAI's servers; send 'input' and 'instructions'",
                             param="prompt")
    value = body.get("input")
    if isinstance(value, str):
        items: list = [{"type": "message", "role": "user", "content": value}]
    elif isinstance(value, list):
        items = value
    else:
        raise InvalidRequest("'input' must be a string or a list of items", param="input")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise InvalidRequest("'instructions' must be a string", param="instructions")
    previous = body.get("previous_response_id")
    if previous is not None and not isinstance(previous, str):
        raise InvalidRequest("'previous_response_id' must be a string", param="previous_response_id")
    stored = body.get("store", True)
    if not isinstance(stored, bool):
        raise InvalidRequest("'store' must be true or false", param="store")
    parent = None
    if previous:
        try:
            parent = store.get(previous)
        except ResponseNotFound as exc:
            raise PreviousNotFound(exc.message, param="previous_response_id") from None
    tools, names, choice = _tools(body.get("tools"), body.get("tool_choice"))
    new = items_to_messages(items, names)
    conversation = (parent.conversation() if parent else []) + new
    if not conversation:
        raise InvalidRequest("'input' is empty", param="input")
    messages = ([{"role": "system", "content": instructions}] if instructions else []) + conversation
    chat = {k: body[k] for k in _PASSED if k in body}
    chat["messages"] = messages
    if tools:
        chat["tools"] = tools
    if choice is not None and tools:
        chat["tool_choice"] = choice
    elif choice not in (None, "auto", "none"):
        raise InvalidRequest("tool_choice needs tools", param="tool_choice")
    fmt = _text_format(body.get("text"))
    if fmt is not None:
        chat["response_format"] = fmt
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
        if isinstance(chat["max_tokens"], bool) or not isinstance(chat["max_tokens"], int):
            raise InvalidRequest("'max_output_tokens' must be an integer", param="max_output_tokens")
    req = oa.parse_chat(chat)
    reasoning = body.get("reasoning") if isinstance(body.get("reasoning"), dict) else None
    echo = {"instructions": instructions, "previous_response_id": previous or None,
            "tools": body.get("tools") or [], "tool_choice": body.get("tool_choice", "auto"),
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "temperature": body.get("temperature"), "top_p": body.get("top_p"),
            "max_output_tokens": body.get("max_output_tokens"),
            "text": {"format": (body.get("text") or {}).get("format") or {"type": "text"}},
            "truncation": body.get("truncation") or "disabled",
            "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")} if reasoning else None,
            "metadata": body.get("metadata") or {}, "store": stored}
    return Parsed(req, new, _with_ids(items), names, echo, stored, parent)


def _with_ids(items: list) -> list[dict]:
    out = []
    for item in items:
        item = dict(item)
        item.setdefault("type", "message")
        item.setdefault("id", new_id("msg" if item["type"] == "message" else "item"))
        out.append(item)
    return out


# -- response: a reply as items ---------------------------------------------------------------------
def _message(mid: str, text: str) -> dict:
    return {"id": mid, "type": "message", "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def _reasoning(rid: str, text: str) -> dict:
    # the text itself, as OpenAI gives an open-weight model's reasoning; there is no summary
    return {"id": rid, "type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": text}]}


def _call(fid: str, call: dict, names: ToolNames, status: str = "completed") -> dict:
    fn = call["function"]
    if fn["name"] in names.custom:
        try:
            value = json.loads(fn["arguments"]).get("input", "")
        except (ValueError, AttributeError):
            value = fn["arguments"]
        return {"id": fid, "type": "custom_tool_call", "status": status, "call_id": call["id"], **names.item(fn["name"]),
                "input": value if isinstance(value, str) else json.dumps(value)}
    return {"id": fid, "type": "function_call", "status": status, "call_id": call["id"], **names.item(fn["name"]),
            "arguments": fn["arguments"]}


def output_items(done, names: ToolNames) -> list[dict]:
    """A whole reply's output: its reasoning, its text, its calls, in the order the model wrote them."""
    out = []
    if done.reasoning:
        out.append(_reasoning(new_id("rs"), done.reasoning))
    if done.text or not done.tool_calls:
        out.append(_message(new_id("msg"), done.text))
    out += [_call(new_id("fc"), c, names) for c in done.tool_calls]
    return out


def usage(done, note: dict | None, reasoning_tokens: int) -> dict:
    u = done.usage
    out = {"input_tokens": u.prompt_tokens, "input_tokens_details": {"cached_tokens": u.cached_tokens},
           "output_tokens": u.completion_tokens, "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
           "total_tokens": u.prompt_tokens + u.completion_tokens}
    extra = oa.usage_of(done, note).get("kvside")
    if extra:
        out["kvside"] = extra
    return out


def response_object(rid: str, model: str, created: int, echo: dict, status: str, output: list,
                    usage_: dict | None = None, done=None, error: dict | None = None) -> dict:
    incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
    return {"id": rid, "object": "response", "created_at": created, "status": status,
            "completed_at": int(time.time()) if status in ("completed", "incomplete") else None,
            "model": model, "output": output, "error": error, "incomplete_details": incomplete,
            "usage": usage_, **echo, "background": False, "service_tier": "default"}


def status_of(done) -> str:
    return "incomplete" if done.finish_reason == "length" else "completed"


def reply_message(done) -> dict:
    """The reply as the assistant message a chat client would send back."""
    turn = {"role": "assistant", "content": done.text}
    if done.reasoning:
        turn["reasoning_content"] = done.reasoning
    if done.tool_calls:
        turn["tool_calls"] = [{"id": c["id"], "type": "function",
                               "function": {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}}
                              for c in done.tool_calls]
    return turn


@dataclass
class _Item:
    kind: str  # "reasoning", "message", "function_call" or "custom_tool_call"
    id: str
    index: int
    text: str = ""  # reasoning or message text, or a call's arguments
    call: dict = field(default_factory=dict)  # a call's id and name


class EventWriter:
    """The typed events of a streamed response, from the engine's events. Each output item opens
    with its first event and closes when another begins: reasoning, then text, then one item per
    call. A call is done only once the reply has ended and the engine has read it as a call: an
    agent runs a call when its item is done, and a call cut off or with arguments that are not an
    object is text, never a call (its item is left without a done event and out of the response).
    A custom tool's input is sent whole then too (the model writes it as a JSON string, which is
    not the input until it is decoded)."""

    def __init__(self, names: ToolNames):
        self.names = names
        self.seq = 0
        self.items: list[_Item] = []
        self.open: _Item | None = None
        self.calls_waiting: list[_Item] = []  # closed calls, done when the reply ends

    def event(self, kind: str, **data) -> ServerSentEvent:
        data = {"type": kind, "sequence_number": self.seq, **data}
        self.seq += 1
        return ServerSentEvent(data=json.dumps(data, ensure_ascii=False), event=kind)

    def feed(self, ev) -> list[ServerSentEvent]:
        out: list[ServerSentEvent] = []
        if ev.kind in ("reasoning", "text"):
            kind = "reasoning" if ev.kind == "reasoning" else "message"
            if self.open is None or self.open.kind != kind:
                out += self.close()
                out += self._start(kind, new_id("rs" if kind == "reasoning" else "msg"))
            item = self.open
            item.text += ev.text
            name = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
            extra = {} if kind == "reasoning" else {"logprobs": []}
            out.append(self.event(name, item_id=item.id, output_index=item.index, content_index=0, delta=ev.text,
                                  **extra))
        elif ev.kind == "tool_call":
            out += self.close()
            kind = "custom_tool_call" if ev.data["name"] in self.names.custom else "function_call"
            out += self._start(kind, new_id("fc"), {"id": ev.data["id"], "name": ev.data["name"]})
        elif ev.kind == "tool_args" and self.open is not None and self.open.kind in ("function_call", "custom_tool_call"):
            self.open.text += ev.text
            if self.open.kind == "function_call":
                out.append(self.event("response.function_call_arguments.delta", item_id=self.open.id,
                                      output_index=self.open.index, delta=ev.text))
        return out

    def _start(self, kind: str, iid: str, call: dict | None = None) -> list[ServerSentEvent]:
        item = self.open = _Item(kind, iid, len(self.items), call=call or {})
        self.items.append(item)
        if kind == "custom_tool_call":
            return []
        out = [self.event("response.output_item.added", output_index=item.index, item=self._shape(item, "in_progress"))]
        if kind == "message":
            out.append(self.event("response.content_part.added", item_id=iid, output_index=item.index,
                                  content_index=0, part={"type": "output_text", "text": "", "annotations": [],
                                                         "logprobs": []}))
        return out

    def _shape(self, item: _Item, status: str) -> dict:
        if item.kind == "reasoning":
            return _reasoning(item.id, item.text) if status == "completed" else \
                {"id": item.id, "type": "reasoning", "summary": [], "content": []}
        if item.kind == "message":
            if status == "completed":
                return _message(item.id, item.text)
            return {"id": item.id, "type": "message", "status": status, "role": "assistant", "content": []}
        call = {"id": item.call["id"], "function": {"name": item.call["name"],
                                                    "arguments": item.text if status == "completed" else ""}}
        shaped = _call(item.id, call, self.names, status)
        if status != "completed" and item.kind == "custom_tool_call":
            shaped["input"] = ""
        return shaped

    def close(self) -> list[ServerSentEvent]:
        """Close the open item; a call waits for the reply's end."""
        item, self.open = self.open, None
        if item is None:
            return []
        if item.kind in ("function_call", "custom_tool_call"):
            self.calls_waiting.append(item)
            return []
        return self._done(item)

    def _done(self, item: _Item) -> list[ServerSentEvent]:
        out: list[ServerSentEvent] = []
        if item.kind == "reasoning":
            out.append(self.event("response.reasoning_text.done", item_id=item.id, output_index=item.index,
                                  content_index=0, text=item.text))
        elif item.kind == "message":
            out.append(self.event("response.output_text.done", item_id=item.id, output_index=item.index,
                                  content_index=0, text=item.text, logprobs=[]))
            out.append(self.event("response.content_part.done", item_id=item.id, output_index=item.index,
                                  content_index=0, part=self._shape(item, "completed")["content"][0]))
        elif item.kind == "function_call":
            out.append(self.event("response.function_call_arguments.done", item_id=item.id, output_index=item.index,
                                  arguments=item.text, **self.names.item(item.call["name"])))
        else:
            shaped = self._shape(item, "completed")
            out.append(self.event("response.output_item.added", output_index=item.index,
                                  item=self._shape(item, "in_progress")))
            out.append(self.event("response.custom_tool_call_input.delta", item_id=item.id, output_index=item.index,
                                  delta=shaped["input"]))
            out.append(self.event("response.custom_tool_call_input.done", item_id=item.id, output_index=item.index,
                                  input=shaped["input"]))
        out.append(self.event("response.output_item.done", output_index=item.index,
                              item=self._shape(item, "completed")))
        return out

    def finish(self, done) -> list[ServerSentEvent]:
        """Close what is open, and finish the calls the engine read as calls (their arguments as
        they streamed, so the done event repeats the deltas; the engine's where none streamed); a
        reply with no output at all still gets its (empty) message."""
        out = self.close()
        final = {c["id"]: c["function"]["arguments"] for c in done.tool_calls}
        for item in self.calls_waiting:
            if item.call["id"] in final:
                item.text = item.text or final[item.call["id"]]
                out += self._done(item)
            else:
                self.items.remove(item)
        self.calls_waiting = []
        if not self.items:
            out += self._start("message", new_id("msg"))
            out += self.close()
        return out

    def output(self) -> list[dict]:
        return [self._shape(item, "completed") for item in self.items]


class ResponsesFront:
    """The handlers of /v1/responses, over the daemon's admission, binding and streaming."""

    def __init__(self, daemon, capacity: int = MAX_STORED, folder: Path | None = None):
        self.d = daemon
        self.store = ResponseStore(capacity, folder)

    def routes(self) -> list[Route]:
        routes = []
        for base in ("/v1/responses", "/responses"):
            routes += [Route(base, self.create, methods=["POST"]),
                       Route(base + "/input_tokens", self.input_tokens, methods=["POST"]),
                       Route(base + "/{rid}", self.retrieve, methods=["GET"]),
                       Route(base + "/{rid}", self.delete, methods=["DELETE"]),
                       Route(base + "/{rid}/input_items", self.input_items, methods=["GET"])]
        return routes

    async def retrieve(self, request: HTTPRequest) -> JSONResponse:
        return JSONResponse(self.store.get(request.path_params["rid"]).response)

    async def delete(self, request: HTTPRequest) -> JSONResponse:
        rid = request.path_params["rid"]
        self.store.delete(rid)
        return JSONResponse({"id": rid, "object": "response", "deleted": True})

    async def input_items(self, request: HTTPRequest) -> JSONResponse:
        items = self.store.get(request.path_params["rid"]).input_items
        if request.query_params.get("order", "desc") == "desc":  # OpenAI lists the newest first by default
            items = items[::-1]
        return JSONResponse({"object": "list", "data": items, "first_id": items[0]["id"] if items else None,
                             "last_id": items[-1]["id"] if items else None, "has_more": False})

    async def input_tokens(self, request: HTTPRequest) -> JSONResponse:
        """POST /v1/responses/input_tokens: how many tokens the request's prompt is, as a fresh
        session would read it (the template's rendering with the tools, tokenized)."""
        parsed = parse(await self.d._json(request), self.store)
        _, engine = await self.d.engine_for(parsed.chat.model)
        messages, tools = parsed.chat.messages, parsed.chat.reply.tools
        count = await asyncio.to_thread(engine.call, lambda core: llamacpp.prompt_token_count(core, messages, tools))
        return JSONResponse({"object": "response.input_tokens", "input_tokens": count})

    async def create(self, request: HTTPRequest):
        body = await self.d._json(request)
        parsed = parse(body, self.store)
        req = parsed.chat
        req.served, engine = await self.d.engine_for(req.model)
        explicit = self.d._explicit(request, req)
        stream, queue, note, first = await self.d._start(request, req.stream, lambda on_event: engine.bind_chat(
            req.messages, session=explicit, reuse=self.d.reuse, on_event=on_event, reply=req.reply,
            **req.params), engine, explicit)
        rid, created = new_id("resp"), int(time.time())
        headers = {"X-Kvside-Session": note["session"]}
        if req.stream:
            return self.d._sse(self._events(stream, queue, first, parsed, rid, created, note, engine), headers)
        try:
            done = await self.d._collect(request, stream, queue, note)
        finally:
            self.d._done()
        body = await self._finish(parsed, rid, created, req.served, done, note, engine,
                                  output_items(done, parsed.names))
        return JSONResponse(body, headers=headers)

    async def _finish(self, parsed: Parsed, rid: str, created: int, model: str, done, note: dict, engine,
                      output: list[dict]) -> dict:
        """The response object of a finished reply, stored if asked."""
        reasoning_tokens = 0
        if done.reasoning:
            text = done.reasoning
            reasoning_tokens = await asyncio.to_thread(
                engine.call, lambda core: len(core.model.tokenize(text, add_special=False, parse_special=False)))
        body = response_object(rid, model, created, parsed.echo, status_of(done), output,
                               usage(done, note, reasoning_tokens))
        body["kvside"] = {"notices": done.notices, **note}
        if parsed.names.ignored:
            body["kvside"]["tools_ignored"] = parsed.names.ignored
        if parsed.store:
            stored = Stored(body, parsed.new_messages + [reply_message(done)], parsed.input_items, parsed.parent)
            self.store.put(rid, stored)
            # written off the loop and not waited for: the reply is not held up by an fsync, and a
            # continuation that comes at once finds the response in memory
            asyncio.get_running_loop().run_in_executor(None, self.store.write, rid, stored)
        return body

    async def _events(self, stream, queue, first, parsed: Parsed, rid: str, created: int, note: dict, engine):
        model = parsed.chat.served
        writer = EventWriter(parsed.names)
        try:
            start = response_object(rid, model, created, parsed.echo, "in_progress", [])
            yield writer.event("response.created", response=start)
            yield writer.event("response.in_progress", response=start)
            async for event in self.d._events(queue, first):
                if event.kind == "notice":
                    yield ServerSentEvent(comment=f"kvside {json.dumps(event.data)}")
                elif event.kind == "error":
                    err = event.data["error"]
                    yield writer.event("error", code=err.code or err.kind, message=err.message, param=err.param)
                    failed = response_object(rid, model, created, parsed.echo, "failed", writer.output(),
                                             error={"code": err.code or "server_error", "message": err.message})
                    yield writer.event("response.failed", response=failed)
                    break
                elif event.kind == "done":
                    done = stream.completion
                    self.d.replied(done, note)
                    for out in writer.finish(done):
                        yield out
                    body = await self._finish(parsed, rid, created, model, done, note, engine, writer.output())
                    body["timings"] = llamacpp.timings(done)
                    # response.completed even when max_output_tokens cut the reply (its status says
                    # "incomplete"): the openai client's stream helper and Codex end a stream on
                    # response.completed alone, and treat one without it as broken
                    yield writer.event("response.completed", response=body)
                else:
                    for out in writer.feed(event):
                        yield out
        finally:
            self.d._stream_ended(stream)
