"""What the chat app talks to: the engine in-process, or a running daemon over HTTP. Both give the
same small interface, so the app never knows which; neither touches llama.cpp from the UI thread."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import AsyncIterator

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
    def __init__(self, engine):
        self.engine = engine
        self.info = engine.info()

    async def call(self, fn, *args, **kwargs):
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def sessions(self) -> list[dict]:
        return await self.call(self.engine.sessions)

    async def new_session(self, name: str | None = None, system: str | None = None) -> str:
        return await self.call(self.engine.new_session, name, system)

    async def delete_session(self, name: str) -> None:
        await self.call(self.engine.delete_session, name)

    async def cache_map(self, name: str) -> dict:
        def snapshot(core):
            s = core.get(name)
            return {"runs": s.ledger.runs(), "removed": [vars(r) for r in s.ledger.removed],
                    "next_pos": s.ledger.next_pos, "n_cells": len(s.ledger), "n_ctx": core.n_ctx,
                    "messages": [m.to_dict() for m in s.messages]}

        return await self.call(self.engine.call, snapshot, session=name)

    def chat(self, name: str, text: str, **params) -> Reply:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def forward(event):
            if event.kind == "done":
                done = stream.completion
                item = ("done", {"finish_reason": done.finish_reason, "tokens": done.usage.completion_tokens,
                                 "cached": done.usage.cached_tokens, "prompt": done.usage.prompt_tokens,
                                 "tok_s": done.decode_tok_s, "t_prefill_s": done.t_prefill_s})
            elif event.kind == "error":
                item = ("error", event.text)
            elif event.kind == "notice":
                item = ("notice", event.data)
            else:
                item = (event.kind, event.text)
            loop.call_soon_threadsafe(queue.put_nowait, item)

        stream = self.engine.chat(name, text, on_event=forward, **params)
        return Reply(queue, stream.cancel)

    async def edit(self, name: str, edit: str, **args) -> dict:
        e = self.engine
        calls = {
            "roll": lambda: e.roll(name, int(args["drop"]), args.get("keep"), args.get("strategy")),
            "compact": lambda: e.compact(name, int(args["up_to"]), args.get("summary"), args.get("mode", "mask")),
            "mask": lambda: e.mask(name, messages=[int(x) for x in args["messages"]], close_gap=bool(args.get("close_gap")),
                                   strategy=str(args.get("strategy") or "shift")),
            "fork": lambda: {"session": e.fork(name, args.get("new_name"))},
            "save": lambda: e.save(name, args.get("path")),
            "strategy": lambda: (e.set_roll_strategy(name, args["strategy"]), {"strategy": args["strategy"]})[1],
            "erratum": lambda: e.erratum(name, args["text"]),
            "attach": lambda: e.attach(name, args["document"], int(args.get("recompute", 0)), args.get("strategy")),
        }
        if edit not in calls:
            raise KvsideError(f"unknown command {edit}")
        return await self.call(calls[edit])

    async def restore(self, path: str, name: str | None = None) -> str:
        return await self.call(self.engine.restore, path, name)


class RemoteBackend(_Backend):
    """The same interface over a running `kvside serve` (--connect URL)."""

    def __init__(self, url: str, api_key: str | None = None):
        import httpx

        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=300)
        self.info: dict = {"model_name": "?", "n_ctx": 0}

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

        return name or f"tui-{uuid.uuid4().hex[:6]}"  # the daemon creates it on first use

    async def delete_session(self, name: str) -> None:
        await self._json("DELETE", f"/kvside/sessions/{name}")

    async def cache_map(self, name: str) -> dict:
        try:
            data = await self._json("GET", f"/kvside/sessions/{name}")
        except KvsideError:
            return {"runs": [], "removed": [], "next_pos": 0, "n_cells": 0, "n_ctx": self.n_ctx, "messages": []}
        s = data["session"]
        return {"runs": data["cache_map"], "removed": data["removed"], "next_pos": s["next_pos"],
                "n_cells": s["n_cells"], "n_ctx": self.n_ctx, "messages": data["messages"]}

    def chat(self, name: str, text: str, **params) -> Reply:
        queue: asyncio.Queue = asyncio.Queue()
        body = {"messages": [{"role": "user", "content": text}], "stream": True,
                "stream_options": {"include_usage": True}, **params}

        async def pump():
            try:
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
        body = dict(args)
        if edit == "fork":
            body = {"name": args.get("new_name")}
        return await self._json("POST", f"/kvside/sessions/{name}/{edit}", json=body)

    async def restore(self, path: str, name: str | None = None) -> str:
        return (await self._json("POST", "/kvside/restore", json={"path": path, "name": name}))["session"]


async def drain(reply: Reply) -> AsyncIterator[tuple[str, object]]:
    while True:
        kind, value = await reply.events.get()
        yield kind, value
        if kind in ("done", "error"):
            return
