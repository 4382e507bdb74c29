"""What the chat app talks to: the engine in-process, or a running daemon over HTTP. Both give the
same small interface, so the app never knows which; neither touches llama.cpp from the UI thread."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import AsyncIterator

from kvside.engine import commands
from kvside.errors import KvsideError


@dataclass
class Reply:
    """Events of one reply: ("text", str), ("notice", dict), ("done", dict), ("error", str)."""

    events: asyncio.Queue
    cancel: callable


class _Backend:
    info: dict

    @property
    def model_name(self) -> str:
        return self.info["model_name"]

    @property
    def n_ctx(self) -> int:
        return self.info["n_ctx"]


class LocalBackend(_Backend):
    def __init__(self, engine, params: dict | None = None):
        self.engine = engine
        self.info = engine.info()
        self.params = dict(params or {})  # sampling flags of `kvside chat`, for every reply

    async def call(self, fn, *args, **kwargs):
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def sessions(self) -> list[dict]:
        return await self.call(self.engine.sessions)

    async def new_session(self, name: str | None = None, system: str | None = None) -> str:
        return await self.call(self.engine.new_session, name, system)

    async def delete_session(self, name: str) -> None:
        await self.call(self.engine.delete_session, name)

    async def cache_map(self, name: str) -> dict:
        return _cache_map(await self.call(self.engine.show, name))

    def chat(self, name: str, text: str) -> Reply:
        return self._reply(lambda forward: self.engine.chat(name, text, on_event=forward, **self.params))

    def again(self, name: str) -> Reply:
        """Another reply to the session's last message, the last reply dropped."""
        return self._reply(lambda forward: self.engine.again(name, on_event=forward, **self.params))

    def _reply(self, start) -> Reply:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def forward(event):
            if event.kind == "done":
                done = stream.completion
                item = ("done", {"finish_reason": done.finish_reason, "tokens": done.usage.completion_tokens,
                                 "cached": done.usage.cached_tokens, "prompt": done.usage.prompt_tokens,
                                 "tok_s": done.decode_tok_s, "t_prefill_s": done.t_prefill_s,
                                 "params": done.params})
            elif event.kind == "error":
                item = ("error", event.text)
            elif event.kind == "notice":
                item = ("notice", event.data)
            else:
                item = (event.kind, event.text)
            loop.call_soon_threadsafe(queue.put_nowait, item)

        stream = start(forward)
        return Reply(queue, stream.cancel)

    async def edit(self, name: str, edit: str, **args) -> dict:
        if edit == "save" and args.get("path"):  # the user's own file, from the app on their machine
            return await self.call(self.engine.save, name, args["path"])
        return await self.call(commands.apply, self.engine, name, edit, args)

    async def rename(self, name: str, new_name: str) -> None:
        await self.call(self.engine.rename, name, new_name)

    async def restore(self, path: str, name: str | None = None) -> str:
        return await self.call(self.engine.restore, path, name)


def _cache_map(shown: dict) -> dict:
    s = shown["session"]
    return {"runs": shown["cache_map"], "removed": shown["removed"], "next_pos": s["next_pos"],
            "n_cells": s["n_cells"], "n_ctx": shown["n_ctx"], "messages": shown["messages"]}


class RemoteBackend(_Backend):
    """The same interface over a running `kvside serve` (--connect URL)."""

    def __init__(self, url: str, api_key: str | None = None, params: dict | None = None):
        import httpx

        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=300)
        self.info: dict = {"model_name": "?", "n_ctx": 0}
        self.params = dict(params or {})
        self.systems: dict[str, str] = {}  # system prompts of sessions not created on the daemon yet

    async def connect(self) -> None:
        r = await self.http.get("/health")
        self.info["model_name"] = r.json().get("model", "?")

    async def _json(self, method: str, path: str, **kw) -> dict:
        r = await self.http.request(method, path, **kw)
        data = r.json()
        if r.status_code >= 400:
            raise KvsideError(data.get("error", {}).get("message", f"HTTP {r.status_code}"))
        return data

    async def sessions(self) -> list[dict]:
        return (await self._json("GET", "/kvside/sessions"))["sessions"]

    async def new_session(self, name: str | None = None, system: str | None = None) -> str:
        import uuid

        name = name or f"tui-{uuid.uuid4().hex[:6]}"  # the daemon creates it on first use
        if system:
            self.systems[name] = system  # sent before the first message
        return name

    async def delete_session(self, name: str) -> None:
        await self._json("DELETE", f"/kvside/sessions/{name}")

    async def cache_map(self, name: str) -> dict:
        try:
            return _cache_map(await self._json("GET", f"/kvside/sessions/{name}"))
        except KvsideError:  # a session the daemon creates on its first message
            return {"runs": [], "removed": [], "next_pos": 0, "n_cells": 0, "n_ctx": self.n_ctx, "messages": []}

    def chat(self, name: str, text: str) -> Reply:
        system = self.systems.pop(name, None)
        first = [{"role": "system", "content": system}] if system else []
        return self._reply(name, lambda: first + [{"role": "user", "content": text}])

    def again(self, name: str) -> Reply:
        """Another reply to the session's last message: its history is sent again without the last
        reply, as any client asks for one (the daemon drops that reply's cells and reads only the
        generation prompt)."""
        async def history() -> list[dict]:
            shown = await self._json("GET", f"/kvside/sessions/{name}")
            rows = [m for m in shown["messages"]
                    if m.get("kind", "chat") in ("chat", "tool") and m.get("state", "live") != "dropped"]
            live = [i for i, m in enumerate(rows) if m.get("state", "live") == "live"]
            if len(live) < 2 or rows[live[-1]]["role"] != "assistant":
                raise KvsideError(f"session {name!r} has no reply to a message of yours to give again")
            if live[-1] < 2:
                # a single message sent to a named session is taken as a new one (the user said it
                # again), not as the history without its reply
                raise KvsideError("over --connect, /retry needs a system prompt or an earlier exchange before "
                                  "the reply; the in-process chat has no such limit")
            return [{"role": m["role"], "content": m["content"]} for m in rows[: live[-1]]]

        return self._reply(name, history)

    def _reply(self, name: str, messages) -> Reply:
        """Stream a reply in session `name` to the messages that `messages()` returns (a list, or a
        coroutine of one)."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump():
            try:
                sent = messages()
                if asyncio.iscoroutine(sent):
                    sent = await sent
                body = {"messages": sent, "stream": True, "stream_options": {"include_usage": True},
                        **_openai_params(self.params)}
                async with self.http.stream("POST", "/v1/chat/completions", json=body,
                                            headers={"X-Kvside-Session": name}) as r:
                    if r.status_code >= 400:
                        data = json.loads(await r.aread())
                        await queue.put(("error", data.get("error", {}).get("message", "error")))
                        return
                    usage, finish = {}, "stop"
                    async for line in r.aiter_lines():
                        if line.startswith(": kvside "):
                            await queue.put(("notice", json.loads(line[9:])))
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        usage = chunk.get("usage") or usage
                        for c in chunk.get("choices", []):
                            if (c.get("delta") or {}).get("content"):
                                await queue.put(("text", c["delta"]["content"]))
                            finish = c.get("finish_reason") or finish
                    await queue.put(("done", {"finish_reason": finish, "tokens": usage.get("completion_tokens", 0),
                                              "cached": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
                                              "prompt": usage.get("prompt_tokens", 0), "tok_s": 0.0, "t_prefill_s": 0.0}))
            except asyncio.CancelledError:
                await queue.put(("done", {"finish_reason": "cancelled", "tokens": 0, "cached": 0, "prompt": 0,
                                          "tok_s": 0.0, "t_prefill_s": 0.0}))
            except Exception as exc:  # shown to the user as a notification
                await queue.put(("error", str(exc)))

        task = asyncio.get_running_loop().create_task(pump())
        return Reply(queue, task.cancel)

    async def edit(self, name: str, edit: str, **args) -> dict:
        if edit == "save" and args.get("path"):
            raise KvsideError("a daemon saves sessions by name: /save without a file, or `kvside save NAME FILE`")
        return await self._json("POST", f"/kvside/sessions/{name}/{edit}", json=args)

    async def rename(self, name: str, new_name: str) -> None:
        raise KvsideError("renaming needs the in-process engine (not --connect)")

    async def restore(self, path: str, name: str | None = None) -> str:
        """Over HTTP a saved session is named, never pathed: `path` is its name."""
        return (await self._json("POST", "/kvside/restore", json={"session": path, "name": name}))["session"]


def _openai_params(params: dict) -> dict:
    """Sampling flags as an OpenAI request's fields (repeat_penalty and min_p are llama.cpp's own,
    which the daemon takes as they are)."""
    return {k: v for k, v in params.items() if v is not None}


async def drain(reply: Reply) -> AsyncIterator[tuple[str, object]]:
    while True:
        kind, value = await reply.events.get()
        yield kind, value
        if kind in ("done", "error"):
            return
