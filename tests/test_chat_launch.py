"""`kvside chat` through its real entry point (the parsed command line): launched twice on one
home, and with every sampling flag, each of which must reach the replies."""

import asyncio

import pytest

from kvside.cli import build_parser, chat_app
from kvside.tui.app import PromptInput

def launch(folder, *flags):
    ns = build_parser().parse_args(["chat", "--n-ctx", "256", "--threads", "2", "--sessions-dir", str(folder), *flags])
    return chat_app(ns)


async def started(pilot):
    for _ in range(600):
        if pilot.app.ready:
            return
        await pilot.pause(0.05)
    raise AssertionError(f"the app did not start: {pilot.app.query_one('#status').render()}")


async def send(pilot, text):
    name = pilot.app.current
    prompt = pilot.app.query_one("#prompt", PromptInput)
    prompt.text = text
    prompt.focus()
    await pilot.press("enter")
    for _ in range(200):
        if pilot.app.chats[name].reply is not None or pilot.app.chats[name].last:
            break
        await pilot.pause(0.05)
    for _ in range(4800):
        if pilot.app.chats[name].reply is None:
            return pilot.app.chats[name]
        await pilot.pause(0.05)
    raise AssertionError("the reply did not finish")


def sidebar(app):
    return [item.id for item in app.query_one("#sidebar").children]


@pytest.mark.asyncio
async def test_the_second_launch_lists_saved_sessions_and_can_chat(tmp_path):
    app, close = launch(tmp_path, "-t", "0", "-n", "6")
    async with app.run_test(size=(120, 40)) as pilot:
        await started(pilot)
        first = app.current
        chat = await send(pilot, "My name is Ada.")
        assert chat.items[-1].text
    assert close() == []
    assert (tmp_path / f"{first}.kvs").is_file()

    app, close = launch(tmp_path, "-t", "0", "-n", "6")
    try:
        async with app.run_test(size=(120, 40)) as pilot:
            await started(pilot)
            second = app.current
            assert second != first
            assert set(app.chats) == {first, second}
            assert f"s-{first}" in sidebar(app) and f"s-{second}" in sidebar(app)
            chat = await send(pilot, "Hello again.")  # the new session takes prompts
            assert chat.items[-1].text and chat.last["finish_reason"] in ("stop", "length")
            await app.switch_to(first)  # the saved one opens with its transcript
            assert app.current == first
            assert [i.role for i in app.chats[first].items] == ["user", "assistant"]
            assert "Ada" in app.chats[first].items[0].text
            chat = await send(pilot, "What is my name?")
            assert len(chat.items) == 4
    finally:
        close()


@pytest.mark.asyncio
async def test_a_startup_failure_is_shown_in_the_app(tmp_path):
    app, close = launch(tmp_path, "--model", str(tmp_path / "missing.gguf"))
    try:
        async with app.run_test(size=(120, 40)) as pilot:
            for _ in range(200):
                if "could not start" in str(app.query_one("#status").render()):
                    break
                await pilot.pause(0.05)
            assert "could not start" in str(app.query_one("#status").render())
            assert app.query_one("#prompt").disabled
    finally:
        close()


FLAGS = {
    "max_tokens": (["--max-tokens", "3"], 3),
    "temperature": (["--temperature", "0.3"], 0.3),
    "top_k": (["--top-k", "7"], 7),
    "top_p": (["--top-p", "0.8"], 0.8),
    "min_p": (["--min-p", "0.02"], 0.02),
    "repeat_penalty": (["--repeat-penalty", "1.3"], 1.3),
    "seed": (["--seed", "1234"], 1234),
    "stop": (["--stop", "zebra", "--stop", "yak"], ["zebra", "yak"]),
}


@pytest.fixture(scope="module")
def flagged_reply(tmp_path_factory):
    """One launch with every flag; each test below checks one of them."""
    flags = [f for args, _ in FLAGS.values() for f in args]
    app, close = launch(tmp_path_factory.mktemp("flags"), *flags)

    async def run():
        async with app.run_test(size=(120, 40)) as pilot:
            await started(pilot)
            chat = await send(pilot, "Write a long poem about the sea.")
            return dict(chat.last)

    try:
        return asyncio.run(run())
    finally:
        close()


@pytest.mark.parametrize("flag", list(FLAGS))
def test_every_sampling_flag_reaches_the_reply(flagged_reply, flag):
    assert flagged_reply["params"][flag] == FLAGS[flag][1]


def test_max_tokens_bounds_the_reply(flagged_reply):
    assert flagged_reply["tokens"] <= 3 and flagged_reply["finish_reason"] == "length"


@pytest.mark.asyncio
async def test_stop_strings_end_the_reply(tmp_path):
    app, close = launch(tmp_path, "-t", "0", "-n", "24")
    try:
        async with app.run_test(size=(120, 40)) as pilot:
            await started(pilot)
            free = (await send(pilot, "Count from one to twenty in words.")).items[-1].text
    finally:
        close()
    assert len(free) > 8, free
    stop = free[5:8]  # a piece of what the greedy reply says, so the stop must cut it there
    app, close = launch(tmp_path / "again", "-t", "0", "-n", "24", "--stop", stop)
    try:
        async with app.run_test(size=(120, 40)) as pilot:
            await started(pilot)
            chat = await send(pilot, "Count from one to twenty in words.")
    finally:
        close()
    assert chat.items[-1].text == free[: free.index(stop)]
    assert chat.last["finish_reason"] == "stop"


@pytest.mark.asyncio
async def test_session_flag_opens_that_saved_session(tmp_path):
    app, close = launch(tmp_path, "-t", "0", "-n", "4", "--session", "notes")
    async with app.run_test(size=(120, 40)) as pilot:
        await started(pilot)
        assert app.current == "notes"
        await send(pilot, "The meeting is on Friday.")
    close()
    app, close = launch(tmp_path, "-t", "0", "-n", "4", "--session", "notes")
    try:
        async with app.run_test(size=(120, 40)) as pilot:
            await started(pilot)
            assert app.current == "notes"
            assert "Friday" in app.chats["notes"].items[0].text
    finally:
        close()


@pytest.mark.parametrize("flag", [["--model", "x.gguf"], ["--docs", "."], ["--exact"], ["--n-ctx", "512"],
                                  ["--threads", "1"], ["--sessions-dir", "."], ["--prune-tools", "keep_last=2"]])
def test_engine_flags_with_connect_are_refused_not_ignored(flag, capsys):
    from kvside.cli import main

    assert main(["chat", "--connect", "http://127.0.0.1:9", *flag]) == 2
    assert flag[0] in capsys.readouterr().err
