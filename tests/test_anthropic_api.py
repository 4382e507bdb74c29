"""Anthropic's Messages API (/v1/messages) with the official `anthropic` client: content blocks become
the chat messages the engine binds, the reply comes back as thinking, text and tool_use blocks,
streamed as Anthropic's events, and usage counts cache reads apart, as Anthropic does. On the
default SmolLM2 model the tool paths are the forced ones."""

from __future__ import annotations

import json
from pathlib import Path

import anthropic
import httpx
import pytest

from conftest import LiveDaemon
from kvside.engine import Engine
from kvside.engine.stream import Event, Usage
from kvside.errors import InvalidRequest
from kvside.server import anthropic_api as aa

MODEL = "smollm2-135m"
GREEDY = {"temperature": 0}  # the SDK no longer takes sampling parameters; the daemon still does
WEATHER = {"name": "get_weather", "description": "Weather for a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                            "required": ["city", "days"]}}
ASK = [{"role": "user", "content": "What is the weather in Paris for the next 3 days?"}]


@pytest.fixture(scope="module")
def client(daemon_url):
    return anthropic.Anthropic(base_url=daemon_url, api_key="unused", max_retries=0)


# -- blocks to messages, without a model -------------------------------------------------------------
def test_blocks_become_the_chat_messages_of_the_same_turns():
    system = [{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}},
              {"type": "text", "text": "Use tools."}]
    messages = [
        {"role": "user", "content": "Fix the bug."},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "Read it first.", "signature": "sig"},
            {"type": "redacted_thinking", "data": "opaque"},
            {"type": "text", "text": "Reading."},
            {"type": "tool_use", "id": "t1", "name": "read", "input": {"path": "a.py"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "x = 1"}]},
            {"type": "text", "text": "Go on."}]},
    ]
    assert aa.to_messages(system, messages) == [
        {"role": "system", "content": "You are terse.\n\nUse tools."},
        {"role": "user", "content": "Fix the bug."},
        {"role": "assistant", "content": "Reading.", "reasoning_content": "Read it first.", "tool_calls": [
            {"id": "t1", "type": "function", "function": {"name": "read", "arguments": "{\"path\": \"a.py\"}"}}]},
        {"role": "tool", "tool_call_id": "t1", "content": "x = 1"},
        {"role": "user", "content": "Go on."},
    ]


def test_a_system_message_between_the_turns_stays_where_it_is():
    """Claude Code 2.1 sends {"role": "system"} messages inside `messages`."""
    out = aa.to_messages("S", [{"role": "user", "content": "q"}, {"role": "system", "content": "agents: a, b"},
                               {"role": "user", "content": [{"type": "text", "text": "go"}]}])
    assert out == [{"role": "system", "content": "S"}, {"role": "user", "content": "q"},
                   {"role": "system", "content": "agents: a, b"}, {"role": "user", "content": "go"}]


def test_claude_codes_billing_line_is_not_part_of_the_prompt():
    """Claude Code's first system block is a billing line whose hash changes on every request; in
    the prompt it changed every turn's first tokens, and everything behind it was read again."""
    for cch in ("417", "84c"):
        line = f"x-anthropic-billing-header: cc_version=2.1.197.{cch}; cc_entrypoint=sdk-cli; cch=0a{cch};"
        blocks = [{"type": "text", "text": line}, {"type": "text", "text": "You are an agent."},
                  {"type": "text", "text": "Be brief."}]
        assert aa.to_messages(blocks, ASK)[0] == {"role": "system", "content": "You are an agent.\n\nBe brief."}
        assert aa.to_messages(line + "\nYou are an agent.", ASK)[0] == {"role": "system", "content": "You are an agent."}
        assert aa.to_messages([{"type": "text", "text": line}], ASK) == [{"role": "user", "content": ASK[0]["content"]}]
    said = "Quote this: x-anthropic-billing-header: is a header."  # not a line of its own: kept
    assert aa.to_messages(said, ASK)[0]["content"] == said


def test_a_user_turn_of_tool_results_only_adds_no_empty_user_message():
    out = aa.to_messages(None, [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t"}]}])
    assert out == [{"role": "tool", "tool_call_id": "t", "content": ""}]


@pytest.mark.parametrize("messages, param", [
    ([], "messages"),
    ([{"role": "tool", "content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": [{"type": "image", "source": {}}]}], "messages[0].content[0]"),
    ([{"role": "user", "content": [{"type": "tool_result"}]}], "messages[0].content[0]"),
    ([{"role": "assistant", "content": [{"type": "server_tool_use", "id": "s"}]}], "messages[0].content[0]"),
    ([{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                                     "content": [{"type": "image"}]}]}], "messages[0].content[0].content[0]"),
])
def test_bad_blocks_are_refused_where_they_are(messages, param):
    with pytest.raises(InvalidRequest) as err:
        aa.to_messages(None, messages)
    assert err.value.param == param


class _Stream:
    usage = Usage(prompt_tokens=30, cached_tokens=10)


class _Done:
    text, reasoning, finish_reason = "Hi", "Think", "tool_calls"
    tool_calls = [{"id": "c1", "function": {"name": "read", "arguments": "{\"p\": 1}"}}]
    usage = Usage(prompt_tokens=30, cached_tokens=10, completion_tokens=7)


def test_writer_starts_with_the_prompts_usage_and_opens_a_block_per_kind():
    w = aa.BlockWriter("msg_1", MODEL, _Stream())
    engine_events = [Event("reasoning", "Thi"), Event("reasoning", "nk"), Event("text", "Hi"),
                     Event("tool_call", "read", {"index": 0, "id": "c1", "name": "read"}),
                     Event("tool_args", "{\"p\":", {"index": 0}), Event("tool_args", " 1}", {"index": 0})]
    out = [e for ev in engine_events for e in w.feed(ev)] + w.finish(_Done())
    data = [json.loads(e.data) for e in out]
    assert all(e.event == d["type"] for e, d in zip(out, data))
    assert [d["type"] for d in data] == [
        "message_start", "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "message_delta", "message_stop"]
    assert data[0]["message"]["usage"] == {"input_tokens": 20, "cache_read_input_tokens": 10,
                                           "cache_creation_input_tokens": 0, "output_tokens": 0}
    starts = [d for d in data if d["type"] == "content_block_start"]
    assert [(s["index"], s["content_block"]["type"]) for s in starts] == [(0, "thinking"), (1, "text"), (2, "tool_use")]
    assert starts[2]["content_block"]["id"] == "c1"
    assert data[-2]["delta"]["stop_reason"] == "tool_use" and data[-2]["usage"]["output_tokens"] == 7


# -- the endpoint, with the anthropic client ---------------------------------------------------------
def test_text_reply_whole_and_streamed_agree(client):
    ask = dict(model=MODEL, max_tokens=24, system="You are terse.",
               messages=[{"role": "user", "content": "Name three colours."}], extra_body=GREEDY)
    whole = client.messages.create(**ask)
    assert whole.type == "message" and whole.role == "assistant" and whole.model == MODEL
    assert [b.type for b in whole.content] == ["text"] and whole.content[0].text
    assert whole.stop_reason in ("end_turn", "max_tokens")
    with client.messages.stream(**ask) as s:
        events = list(s)
        final = s.get_final_message()
    assert events[0].type == "message_start" and events[-1].type == "message_stop"
    assert "".join(e.delta.text for e in events if e.type == "content_block_delta") == final.content[0].text
    assert final.content[0].text == whole.content[0].text
    start = events[0].message.usage
    u = final.usage
    assert start.input_tokens + start.cache_read_input_tokens == u.input_tokens + u.cache_read_input_tokens
    assert u.output_tokens == whole.usage.output_tokens


def test_models_list_in_anthropics_shape(client):
    (model,) = [m for m in client.models.list() if m.id == MODEL]
    assert model.type == "model" and model.display_name == MODEL


def test_max_tokens_is_the_stop_reason_when_it_cuts(client):
    m = client.messages.create(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "Tell a long story."}],
                               extra_body=GREEDY)
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 4


def test_forced_tool_streams_its_input_and_the_result_is_read_on_the_same_cache(client):
    with client.messages.stream(model=MODEL, max_tokens=80, messages=ASK, tools=[WEATHER],
                                tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
                                extra_body=GREEDY) as s:
        events = list(s)
        first = s.get_final_message()
    assert first.stop_reason == "tool_use"
    (use,) = first.content
    assert use.type == "tool_use" and use.name == "get_weather"
    partial = "".join(e.delta.partial_json for e in events if e.type == "content_block_delta")
    assert json.loads(partial) == use.input
    assert isinstance(use.input["city"], str) and isinstance(use.input["days"], int)

    second = client.messages.create(model=MODEL, max_tokens=8, tools=[WEATHER], extra_body=GREEDY, messages=ASK + [
        {"role": "assistant", "content": first.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "Sunny, 21 C."}]}])
    assert second.model_extra["kvside"]["reused_messages"] == 2
    read = first.usage.input_tokens + first.usage.cache_read_input_tokens
    assert second.usage.cache_read_input_tokens >= read
    assert second.usage.input_tokens > 0


def test_count_tokens_is_what_a_fresh_session_reads(client):
    ask = dict(model=MODEL, system="You are terse.", messages=[{"role": "user", "content": "Count me."}],
               tools=[WEATHER])
    counted = client.messages.count_tokens(**ask)
    m = client.messages.create(**ask, max_tokens=2, tool_choice={"type": "none"}, extra_body=GREEDY)
    assert counted.input_tokens == m.usage.input_tokens + m.usage.cache_read_input_tokens


def test_structured_output_follows_the_schema(client):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    m = client.messages.create(model=MODEL, max_tokens=60, messages=[{"role": "user", "content": "Describe a person."}],
                               output_config={"format": {"type": "json_schema", "schema": schema}}, extra_body=GREEDY)
    value = json.loads(m.content[0].text)
    assert set(value) == {"name", "age"} and isinstance(value["age"], int)


def test_anthropic_defined_tools_are_left_out_and_said_so(client):
    m = client.messages.create(model=MODEL, max_tokens=80, messages=ASK, extra_body=GREEDY,
                               tools=[{"type": "web_search_20250305", "name": "web_search"}, WEATHER],
                               tool_choice={"type": "any", "disable_parallel_tool_use": True})
    assert [b.type for b in m.content] == ["tool_use"] and m.content[0].name == "get_weather"
    assert m.model_extra["kvside"]["tools_ignored"] == ["web_search_20250305"]


@pytest.mark.parametrize("body, status, kind", [
    ({"model": MODEL, "messages": ASK}, 400, "invalid_request_error"),  # no max_tokens
    ({"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image"}]}]}, 400,
     "invalid_request_error"),
    ({"model": MODEL, "max_tokens": 5, "messages": ASK, "tool_choice": {"type": "any"}}, 400, "invalid_request_error"),
    ({"model": MODEL, "max_tokens": 5, "messages": ASK, "tools": [WEATHER], "tool_choice": {"type": "tool"}}, 400,
     "invalid_request_error"),
    ({"model": "claude-sonnet-4-5", "max_tokens": 5, "messages": ASK}, 404, "not_found_error"),
])
def test_errors_are_in_anthropics_shape(daemon_url, body, status, kind):
    r = httpx.post(f"{daemon_url}/v1/messages", json=body)
    assert r.status_code == status, r.text
    err = r.json()
    assert err["type"] == "error" and err["error"]["type"] == kind and err["error"]["message"]


# -- thinking, on a template whose generation prompt opens a think block -----------------------------
TEMPLATE = Path(__file__).parent / "data" / "drops_reasoning.jinja"


@pytest.fixture(scope="module")
def reasoning_client(tmp_path_factory):
    with Engine(n_ctx=512, max_sessions=2, n_threads=2, chat_template=str(TEMPLATE),
                sessions_dir=str(tmp_path_factory.mktemp("reasoning"))) as e:
        live = LiveDaemon(e)
        yield anthropic.Anthropic(base_url=live.url, api_key="unused", max_retries=0)
        live.stop()


def test_reasoning_is_a_thinking_block(reasoning_client):
    ask = dict(model=MODEL, max_tokens=12, messages=[{"role": "user", "content": "What is the capital of France?"}],
               extra_body=GREEDY)
    with reasoning_client.messages.stream(**ask) as s:
        events = list(s)
        final = s.get_final_message()
    deltas = "".join(e.delta.thinking for e in events if e.type == "content_block_delta")
    assert final.content[0].type == "thinking" and final.content[0].thinking == deltas and deltas
    assert reasoning_client.messages.create(**ask).content[0].thinking == deltas


def test_the_billing_line_is_left_out_on_the_chat_api_too():
    """Proxies that carry Claude Code to the chat API (claude-code-router) pass its billing line
    in the first system message; only there is it read as one."""
    from kvside.server.openai_api import parse_chat

    line = "x-anthropic-billing-header: cc_version=2.1.197.417; cc_entrypoint=cli; cch=0a417;\n"
    req = parse_chat({"messages": [{"role": "system", "content": line + "You are an agent."},
                                   {"role": "user", "content": line + "quoted"}]})
    assert [m["content"] for m in req.messages] == ["You are an agent.", line + "quoted"]
