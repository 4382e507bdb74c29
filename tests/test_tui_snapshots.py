"""Snapshots of the main screen and the cache map. A scripted backend stands in for the model so
the pictures are the same on every machine; the pilot tests in test_tui.py use the real model."""

import asyncio

from kvside.tui.app import ChatApp
from kvside.tui.backend import Reply

SNAPSHOT = {
    "runs": [
        {"msg": 0, "state": "live", "p0": 0, "p1": 24, "n": 24},
        {"msg": 5, "state": "recomputed", "p0": 24, "p1": 40, "n": 16},
        {"msg": 5, "state": "live", "p0": 40, "p1": 90, "n": 50},
        {"msg": 7, "state": "summary", "p0": 120, "p1": 150, "n": 30},
        {"msg": 8, "state": "live", "p0": 150, "p1": 200, "n": 50},
    ],
    "removed": [{"reason": "rolled", "messages": [1, 2], "n_tokens": 180, "first_pos": 24, "last_pos": 203},
                {"reason": "masked", "messages": [6], "n_tokens": 30, "first_pos": 90, "last_pos": 119}],
    "next_pos": 200, "n_cells": 170, "n_ctx": 512,
    "messages": [],
}


class ScriptedBackend:
    model_name = "smollm2-135m"
    n_ctx = 512

    def __init__(self):
        self.count = 0

    async def sessions(self):
        return []

    async def new_session(self, name=None, system=None):
        self.count += 1
        return name or f"s{self.count}"

    async def cache_map(self, name):
        return SNAPSHOT

    def chat(self, name, text, **params):
        queue = asyncio.Queue()
        for piece in ["A **KV cache** keeps the keys ", "and values of earlier tokens, ", "so nothing is recomputed."]:
            queue.put_nowait(("text", piece))
        queue.put_nowait(("done", {"finish_reason": "stop", "tokens": 17, "cached": 120, "prompt": 131,
                                   "tok_s": 0.0, "t_prefill_s": 0.0}))
        return Reply(queue, lambda: None)


def scripted_app():
    async def factory():
        return ScriptedBackend()
    return ChatApp(factory)


async def _until(pilot, done, what: str, limit_s: float = 60.0) -> None:
    """Wait for `done()`: a loaded 2-core CI machine can take seconds where a laptop takes none,
    and a picture taken before the app settles differs from the reference."""
    deadline = asyncio.get_running_loop().time() + limit_s
    while not done():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"the app did not reach the state to photograph: {what}")
        await pilot.pause(0.05)


async def _conversation(pilot):
    app = pilot.app
    await _until(pilot, lambda: app.ready, "a session open")
    prompt = app.query_one("#prompt")
    # a blinking cursor is in the picture or not depending on when it is taken: keep it shown
    prompt.cursor_blink = False
    prompt.text = "What is a KV cache?"
    await pilot.press("enter")
    # the reply's end is settled (status line, full text, map) before `reply` is cleared
    await _until(pilot, lambda: app.chats[app.current].reply is None and "reused 120" in app.chats[app.current].status,
                 "the reply done")
    # the last render (markdown layout, the map) can lag behind the state on a loaded machine
    await pilot.wait_for_scheduled_animations()
    for _ in range(4):
        await pilot.pause(0.1)


def test_main_screen(snap_compare):
    assert snap_compare(scripted_app(), terminal_size=(110, 34), run_before=_conversation)


def test_cache_map_panel(snap_compare):
    from textual.app import App, ComposeResult

    from kvside.tui.cachemap import CacheMap

    class MapOnly(App):
        def compose(self) -> ComposeResult:
            yield CacheMap(id="map")

        def on_mount(self) -> None:
            self.call_after_refresh(lambda: self.query_one(CacheMap).show(SNAPSHOT))

    assert snap_compare(MapOnly(), terminal_size=(90, 8))
