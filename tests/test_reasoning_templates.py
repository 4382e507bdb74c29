"""Templates that rewrite earlier turns: reasoning models' chat templates (Qwen3 and others) show an
assistant turn's reasoning only until the next user message; once it comes, the earlier turn
renders without its think block. kvside edits the held turn in place (the think block's cells go,
the cells after it stay) instead of refusing or reading everything again; where the cache cannot
be written into its past (a recurrent state) the turn is read again from the checkpoint before it.
Either way the cache then holds exactly the client's prompt as the template renders it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kvside.engine import Engine
from kvside.engine.template import ChatTemplate
from test_families import GREEDY, WINDOW, prefilled, probe_tokens
from tinygguf import write

TEMPLATE = Path(__file__).parent / "data" / "drops_reasoning.jinja"


def render(engine, messages: list[dict]) -> str:
    return engine.call(lambda core: core.template.render(messages, add_generation_prompt=True))


def held_text(engine, name: str) -> str:
    """The text of the session's cells, after the BOS token a tokenizer adds."""
    held = engine.ledger(name)

    def text(core):
        bos = core.model.add_bos and held.tok[:1] == [core.model.bos]
        return core.model.detokenize(held.tok[1 if bos else 0:], special=True)

    return engine.call(text)


def two_turns(engine, name: str, events: list) -> list[dict]:
    """A reply that reasons (the generation prompt opens a think block), then the client's next
    request with that reply as it reads it back (reasoning_content) and a new question."""
    first = [{"role": "user", "content": "What is the capital of France?"}]
    done = engine.bind_chat(first, session=name, max_tokens=12, **GREEDY).wait()
    assert done.reasoning and not done.text  # the model reasoned and was cut off
    client = first + [{"role": "assistant", "content": done.text, "reasoning_content": done.reasoning},
                      {"role": "user", "content": "And of Italy?"}]
    second = engine.bind_chat(client, session=name, max_tokens=2, on_event=events.append, **GREEDY).wait()
    events.append(second)
    return client


def assert_cache_is_the_prompt(engine, name: str, client: list[dict], exact: bool) -> None:
    """The cells are the client's prompt as the template renders it and the cache equals its
    ledger; when the edit was exact (reprefill as the strategy, or the turn read again), the
    cache equals a fresh read of the same tokens. (Otherwise the removed think block leaves a
    hole of positions, as every mask does, and the later cells keep the KV they were read with.)"""
    engine.check(name)
    assert held_text(engine, name).startswith(render(engine, client))
    if not exact:
        return
    held = engine.ledger(name)
    fresh = prefilled(engine, held.tok)
    try:
        probe = probe_tokens(engine)
        got, want = engine.next_logits(name, probe, all_logits=True), engine.next_logits(fresh, probe, all_logits=True)
        # equal up to the layout noise of the attention sums (test_diff_binding.close_logits)
        assert (got.argmax(1) == want.argmax(1)).all()
        cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
        assert cos.min() > 0.995 and np.abs(got - want).max() < 1.5
    finally:
        engine.delete_session(fresh)


def test_layout_finds_the_turns_a_template_rewrites():
    t = ChatTemplate(TEMPLATE.read_text())
    held = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1", "reasoning_content": "r1"}]
    k, texts = t.layout(held, [{"role": "user", "content": "q2"}])
    assert k == 1 and texts == ["<|im_start|>assistant\na1<|im_end|>\n", "<|im_start|>user\nq2<|im_end|>\n"]
    assert t.segments(held, [{"role": "user", "content": "q2"}], add_generation_prompt=False) is None
    # a tool result does not end the reasoning: nothing held changes
    k, texts = t.layout(held, [{"role": "tool", "content": "ok"}])
    assert k == 2 and texts == ["<|im_start|>user\n<tool_response>\nok\n</tool_response><|im_end|>\n"]
    # an append-only template: layout is segments
    chatml = ChatTemplate(None)
    assert chatml.layout(held, [{"role": "user", "content": "q2"}]) == \
        (2, chatml.segments(held, [{"role": "user", "content": "q2"}], add_generation_prompt=False))


@pytest.fixture(scope="module")
def default():
    with Engine(n_ctx=640, max_sessions=3, n_threads=2, exact=True, chat_template=str(TEMPLATE)) as e:
        e.arch = "default"
        yield e


@pytest.mark.parametrize("strategy", ["shift", "reprefill"])
def test_an_earlier_turn_loses_its_think_block_in_place(default, strategy):
    name = default.new_session(system="")
    default.set_roll_strategy(name, strategy)
    events = []
    try:
        client = two_turns(default, name, events)
        note = next(e.data for e in events[:-1] if e.kind == "bound")
        assert note["reused_messages"] == 2, note
        restyled = [e.data for e in events[:-1] if e.kind == "notice" and e.data["kind"] == "restyled"]
        assert len(restyled) == 1
        if strategy == "shift":  # the think block's cells go in place
            assert restyled[0]["removed"] > 0 and not restyled[0]["reread_messages"]
        else:  # editing and then reading everything again costs more than reading from the turn
            assert restyled[0]["reread_messages"] == [1]
        log = [x for x in default.edit_log(name) if x["edit"] == "restyle"]
        assert log and log[-1]["removed"] == restyled[0]["removed"]
        # the question's cells were never read again
        usage = events[-1].usage
        if strategy == "shift":
            assert usage.cached_tokens >= len(default.ledger(name)) - restyled[0]["removed"] - 40
        assert_cache_is_the_prompt(default, name, client, exact=strategy == "reprefill")
    finally:
        default.delete_session(name)


def test_a_turn_the_app_continues_is_restyled_too(default):
    """Sessions driven by name (the chat app, the CLI) append only the new message."""
    name = default.new_session(system="")
    try:
        first = default.chat(name, "What is the capital of France?", max_tokens=12, **GREEDY).wait()
        default.chat(name, "And of Italy?", max_tokens=2, **GREEDY).wait()
        client = [{"role": "user", "content": "What is the capital of France?"},
                  {"role": "assistant", "content": first.text, "reasoning_content": first.reasoning},
                  {"role": "user", "content": "And of Italy?"}]
        assert_cache_is_the_prompt(default, name, client, exact=False)
    finally:
        default.delete_session(name)


@pytest.fixture(scope="module", params=["mamba", "gemma3"])
def tiny(request, tmp_path_factory):
    path = write(request.param, tmp_path_factory.mktemp("tiny-think") / f"{request.param}.gguf", window=WINDOW)
    with Engine(model=str(path), n_ctx=512, max_sessions=3, n_threads=2, exact=True, swa_full=False,
                chat_template=str(TEMPLATE)) as e:
        e.arch = request.param
        yield e


def test_a_cache_that_cannot_go_back_reads_the_turn_again_from_its_checkpoint(tiny):
    name = tiny.new_session(system="")
    events = []
    try:
        client = two_turns(tiny, name, events)
        restyled = next(e.data for e in events[:-1] if e.kind == "notice" and e.data["kind"] == "restyled")
        if tiny.arch == "mamba":  # the state cannot lose the think block: the turn is read again
            assert restyled["reread_messages"] == [1] and restyled["removed"] == 0
            rebuilt = next(e.data for e in events[:-1] if e.kind == "notice" and e.data["kind"] == "rebuilt")
            assert rebuilt["from_checkpoint"] > 0
        assert_cache_is_the_prompt(tiny, name, client, exact=bool(restyled["reread_messages"]))
    finally:
        tiny.delete_session(name)


@pytest.mark.parametrize("sent_back", [True, False])
def test_a_reply_sent_back_without_its_reasoning_loses_its_think_block(default, sent_back):
    """In a tool loop the template keeps a turn's think block while its reasoning is sent back;
    most clients send none back, and then the turn renders without it (llama.cpp reads the whole
    prompt again): kvside takes the client's version and edits the cells to match."""
    name = default.new_session(system="")
    events = []
    try:
        first = [{"role": "user", "content": "What is the capital of France?"}]
        done = default.bind_chat(first, session=name, max_tokens=12, **GREEDY).wait()
        reply = {"role": "assistant", "content": done.text}
        if sent_back:
            reply["reasoning_content"] = done.reasoning
        client = first + [reply, {"role": "tool", "content": "Paris"}]
        default.bind_chat(client, session=name, max_tokens=2, on_event=events.append, **GREEDY).wait()
        restyled = [e.data for e in events if e.kind == "notice" and e.data["kind"] == "restyled"]
        assert bool(restyled) == (not sent_back)
        assert_cache_is_the_prompt(default, name, client, exact=False)
    finally:
        default.delete_session(name)
