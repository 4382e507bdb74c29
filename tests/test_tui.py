"""The chat app driven by Textual's pilot against the real default model."""


import pytest

from kvside.engine import Engine
from kvside.tui.app import ChatApp, PromptInput
from kvside.tui.backend import LocalBackend
from kvside.tui.cachemap import CacheMap

pytestmark = pytest.mark.asyncio


@pytest.fixture(scope="module")
def tui_engine(tmp_path_factory):
    with Engine(n_ctx=256, max_sessions=4, n_threads=2, sessions_dir=str(tmp_path_factory.mktemp("tui"))) as e:
        yield e


def app_for(engine, params=None):
    async def factory():
        return LocalBackend(engine, params)
    return ChatApp(factory)


async def ready(pilot):
    for _ in range(200):
        if pilot.app.current is not None:
            return
        await pilot.pause(0.05)
    raise AssertionError("the app did not start")


async def type_and_send(pilot, text):
    prompt = pilot.app.query_one("#prompt", PromptInput)
    prompt.text = text
    prompt.focus()
    await pilot.press("enter")


async def wait_idle(pilot, name, timeout=240):
    for _ in range(int(timeout / 0.05)):
        if pilot.app.chats[name].reply is None:
            return
        await pilot.pause(0.05)
    raise AssertionError("the reply did not finish")


async def test_send_and_stream_a_reply(tui_engine):
    app = app_for(tui_engine)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot)
        name = app.current
        await type_and_send(pilot, "Say hello in three words.")
        await wait_idle(pilot, name)
        items = app.chats[name].items
        assert [i.role for i in items] == ["user", "assistant"]
        assert items[1].text.strip()
        assert app.query_one("#prompt", PromptInput).text == ""
        assert "reused" in str(app.query_one("#status").render())


async def test_escape_cancels_and_keeps_the_prompt(tui_engine):
    app = app_for(tui_engine, {"max_tokens": 200, "ignore_eos": True})  # a reply that cannot end on its own soon
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot)
        name = app.current
        await type_and_send(pilot, "Write a very long story about a lighthouse keeper and the sea.")
        for _ in range(400):  # until the reply is streaming
            if app.chats[name].items[-1].text:
                break
            await pilot.pause(0.05)
        prompt = app.query_one("#prompt", PromptInput)
        prompt.text = "my next question"
        await pilot.press("escape")
        await wait_idle(pilot, name)
        assert prompt.text == "my next question"
        assert app.chats[name].last["finish_reason"] == "cancelled"
        assert app.chats[name].last["tokens"] < 200


async def test_switching_sessions_mid_stream_keeps_replies_apart(tui_engine):
    app = app_for(tui_engine)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot)
        first = app.current
        await type_and_send(pilot, "Describe the moon in two sentences.")
        await pilot.pause(0.2)
        await app.new_chat(None)
        second = app.current
        assert second != first
        await type_and_send(pilot, "Name three colors.")
        await wait_idle(pilot, first)
        await wait_idle(pilot, second)
        a, b = app.chats[first].items, app.chats[second].items
        assert [i.role for i in a] == ["user", "assistant"] == [i.role for i in b]
        assert a[0].text.startswith("Describe") and b[0].text.startswith("Name")
        assert a[1].text and b[1].text
        # what the engine holds for each session matches what each transcript shows
        for name, chat in ((first, a), (second, b)):
            msgs = tui_engine.messages(name)
            assert msgs[-1]["content"] == chat[1].text


async def test_roll_command_changes_the_cache_map(tui_engine):
    app = app_for(tui_engine)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot)
        name = app.current
        await type_and_send(pilot, "Tell me about rivers.")
        await wait_idle(pilot, name)
        before = len(tui_engine.ledger(name))
        await type_and_send(pilot, "/roll 10")
        for _ in range(200):  # the map refreshes after the command returns
            after = app.query_one("#map", CacheMap).snapshot
            if after.get("n_cells") == before - 10:
                break
            await pilot.pause(0.05)
        assert after["n_cells"] == before - 10
        assert any(r["reason"] == "rolled" for r in after["removed"])


async def test_auto_roll_shows_a_notice(tmp_path):
    with Engine(n_ctx=96, max_sessions=1, n_threads=2, sessions_dir=str(tmp_path)) as engine:
        app = app_for(engine)
        async with app.run_test(size=(120, 40)) as pilot:
            await ready(pilot)
            name = app.current
            notes = []
            app.notify = lambda message, **kw: notes.append((kw.get("title"), message))  # record
            for q in ["Tell me about the ocean.", "And about mountains?", "And rivers?"]:
                await type_and_send(pilot, q)
                await wait_idle(pilot, name)
            assert any(title == "auto-roll" for title, _ in notes), notes


async def test_failed_command_is_a_notification_not_a_crash(tui_engine):
    app = app_for(tui_engine)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot)
        notes = []
        app.notify = lambda message, **kw: notes.append((kw.get("title"), kw.get("severity"), message))
        await type_and_send(pilot, "/roll 999999")
        await type_and_send(pilot, "/mask nope")
        await type_and_send(pilot, "/frobnicate")
        for _ in range(100):
            if len(notes) >= 3:
                break
            await pilot.pause(0.05)
        assert app.is_running
        assert [(title, severity) for title, severity, _ in notes] == [
            ("/roll", "error"), ("/mask", "error"), (None, "error")]
        assert "cannot drop" in notes[0][2] and "usage" in notes[1][2] and "unknown command /frobnicate" in notes[2][2]


async def test_prune_tools_command_sets_the_session_policy(tui_engine):
    app = app_for(tui_engine)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot)
        name = app.current
        notes = []
        app.notify = lambda message, **kw: notes.append((kw.get("title"), message))
        await type_and_send(pilot, "/prune-tools 2")
        for _ in range(100):
            if tui_engine.call(lambda core: core.get(name).prune_tools) == 2:
                break
            await pilot.pause(0.05)
        assert tui_engine.call(lambda core: core.get(name).prune_tools) == 2
        await type_and_send(pilot, "/prune-tools off")
        for _ in range(100):
            if tui_engine.call(lambda core: core.get(name).prune_tools) is None:
                break
            await pilot.pause(0.05)
        assert tui_engine.call(lambda core: core.get(name).prune_tools) is None
        await type_and_send(pilot, "/prune-tools lots")
        for _ in range(100):
            if any("usage" in str(m) for _, m in notes):
                break
            await pilot.pause(0.05)
        assert any("usage: /prune-tools" in str(m) for _, m in notes), notes


async def test_fidelity_command_scores_the_cache_after_a_roll(tui_engine):
    """/fidelity: the last reply on this cache against a re-prefill of the same tokens."""
    app = app_for(tui_engine)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot)
        name = app.current
        notes = []
        app.notify = lambda message, **kw: notes.append((kw.get("title"), message, kw.get("severity")))
        await type_and_send(pilot, "/fidelity")
        for _ in range(100):
            if notes:
                break
            await pilot.pause(0.05)
        assert notes[0][2] == "error" and "too little" in notes[0][1]  # nothing to measure yet
        for text in ("Name a colour.", "Name a fruit."):
            await type_and_send(pilot, text)
            await wait_idle(pilot, name)
        await type_and_send(pilot, "/roll 8")
        await type_and_send(pilot, "/fidelity 8")
        for _ in range(400):
            if any(title == "fidelity" for title, _, _ in notes):
                break
            await pilot.pause(0.05)
        message = next(m for title, m, _ in notes if title == "fidelity")
        assert message.startswith("8 tokens after") and "KL" in message and "top-1" in message


async def test_retry_gives_another_answer_reading_only_the_generation_prompt(tui_engine):
    """/retry answers the last message again: the old reply leaves the transcript and the cache,
    the user's message keeps its cells, and only the generation prompt is read (a chat without a
    system prompt, where the history is one message: no client could ask this over HTTP)."""
    app = app_for(tui_engine, {"temperature": 1.0, "seed": 7, "max_tokens": 12})
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot)
        name = app.current
        notes = []
        app.notify = lambda message, **kw: notes.append(message)
        await type_and_send(pilot, "/retry")  # nothing to give again yet
        await pilot.pause(0.1)
        assert notes and "no reply" in notes[-1]
        await type_and_send(pilot, "Name a fruit and a colour.")
        await wait_idle(pilot, name)
        before = tui_engine.ledger(name)
        reply_id = max(before.msg)
        await type_and_send(pilot, "/retry")
        await pilot.pause(0.1)
        await wait_idle(pilot, name)
        items = app.chats[name].items
        assert [i.role for i in items] == ["user", "assistant"] and items[1].text.strip()
        done = app.chats[name].last
        assert done["prompt"] - done["cached"] <= 4, done  # <|im_start|>assistant\n
        live = [m for m in tui_engine.messages(name) if m["state"] == "live"]
        assert [m["role"] for m in live] == ["user", "assistant"] and live[1]["id"] != reply_id
        assert live[1]["content"] == items[1].text
        after = tui_engine.ledger(name)
        kept = [(t, p) for t, p, m in zip(before.tok, before.pos, before.msg) if m != reply_id]
        assert list(zip(after.tok, after.pos))[: len(kept)] == kept
        tui_engine.check(name)


async def test_retry_over_connect_sends_the_history_without_its_reply(tui_engine):
    """`kvside chat --connect URL`: /retry sends the session's history again without its last reply,
    as any client asks for another answer, and the daemon reads only the generation prompt. A
    single message before the reply would be taken as a new message, so that is refused, clearly."""
    from conftest import LiveDaemon

    from kvside.tui.backend import RemoteBackend, drain

    live = LiveDaemon(tui_engine)
    backend = RemoteBackend(live.url, params={"max_tokens": 8, "temperature": 1.0})
    try:
        await backend.connect()
        bare = await backend.new_session("remote-bare")
        async for _ in drain(backend.chat(bare, "Hello there.")):
            pass
        events = [e async for e in drain(backend.again(bare))]
        assert events[-1][0] == "error" and "--connect" in events[-1][1]
        name = await backend.new_session("remote-retry", system="You are terse.")
        async for _ in drain(backend.chat(name, "Name a fruit.")):
            pass
        reply_id = max(tui_engine.ledger(name).msg)
        events = [e async for e in drain(backend.again(name))]
        kind, done = events[-1]
        assert kind == "done" and 0 < done["prompt"] - done["cached"] <= 4, events
        live_msgs = [m for m in tui_engine.messages(name) if m["state"] == "live"]
        assert [m["role"] for m in live_msgs] == ["system", "user", "assistant"] and live_msgs[-1]["id"] != reply_id
        assert live_msgs[-1]["content"] == "".join(v for k, v in events if k == "text")
        tui_engine.check(name)
    finally:
        await backend.http.aclose()
        live.stop()
        for n in ("remote-bare", "remote-retry"):
            try:
                tui_engine.delete_session(n)
            except Exception:
                pass
