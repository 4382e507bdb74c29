"""OpenAI's Responses API (/v1/responses) with the official `openai` client: input items become the
chat messages the engine binds, the reply comes back as output items (reasoning, message, calls),
streamed as typed events, and a stored response is continued with `previous_response_id` from the
session that holds it. On the default SmolLM2 model the tool paths are the forced ones."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
from openai import BadRequestError, NotFoundError, OpenAI

from conftest import LiveDaemon
from kvside.engine import Engine
from kvside.engine.stream import Event
from kvside.errors import InvalidRequest, KvsideError
from kvside.server import responses_api as ra

MODEL = "smollm2-135m"
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather for a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                          "required": ["city", "days"]}}
PATCH = {"type": "custom", "name": "apply_patch", "description": "Apply a patch to the repository"}
INSTRUCTIONS = "You are a terse assistant."


@pytest.fixture(scope="module")
def client(daemon_url):
    return OpenAI(base_url=daemon_url + "/v1", api_key="unused", max_retries=0)


def events_of(stream) -> list:
    return list(stream)


# -- items to messages, without a model ------------------------------------------------------------
def test_one_model_turn_of_items_is_one_assistant_message():
    names = ra.ToolNames(custom={"apply_patch"})
    items = [
        {"role": "developer", "content": "Be brief."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Fix "},
                                                        {"type": "input_text", "text": "it"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "Look."}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "On it."}]},
        {"type": "function_call", "call_id": "c1", "name": "read", "arguments": "{\"path\": \"a\"}"},
        {"type": "custom_tool_call", "call_id": "c2", "name": "apply_patch", "input": "*** Begin Patch"},
        {"type": "function_call_output", "call_id": "c1", "output": [{"type": "input_text", "text": "text of a"}]},
        {"type": "custom_tool_call_output", "call_id": "c2", "output": "Done"},
    ]
    assert ra.items_to_messages(items, names) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Fix it"},
        {"role": "assistant", "content": "On it.", "reasoning_content": "Look.", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "read", "arguments": "{\"path\": \"a\"}"}},
            {"id": "c2", "type": "function", "function": {"name": "apply_patch",
                                                          "arguments": "{\"input\": \"*** Begin Patch\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "text of a"},
        {"role": "tool", "tool_call_id": "c2", "content": "Done"},
    ]


def test_a_call_without_text_and_a_namespaced_call():
    names = ra.ToolNames(namespaced={"agents.spawn": ("agents", "spawn")})
    items = [{"role": "user", "content": "go"},
             {"type": "function_call", "call_id": "c1", "namespace": "agents", "name": "spawn", "arguments": "{}"}]
    assert ra.items_to_messages(items, names)[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "agents.spawn", "arguments": "{}"}}]}
    assert names.item("agents.spawn") == {"name": "spawn", "namespace": "agents"}


def test_reasoning_cut_off_before_any_text_is_a_turn_of_its_own():
    items = [{"role": "user", "content": "Hi"},
             {"type": "reasoning", "summary": [{"type": "summary_text", "text": "Greet"}],
              "encrypted_content": "gAAAA-ciphertext"},
             {"role": "user", "content": "Hello?"}]
    assert ra.items_to_messages(items, ra.ToolNames()) == [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "", "reasoning_content": "Greet"},
        {"role": "user", "content": "Hello?"}]


@pytest.mark.parametrize("item, param", [
    ({"type": "foo"}, "input[0].type"),
    ({"role": "tool", "content": "x"}, "input[0].role"),
    ({"role": "user", "content": [{"type": "input_image", "image_url": "data:"}]}, "input[0].content[0]"),
    ({"type": "function_call", "name": "f", "arguments": "{}"}, "input[0]"),
    ({"type": "function_call", "call_id": "c", "name": "f", "arguments": {"a": 1}}, "input[0].arguments"),
    ({"type": "function_call_output", "call_id": "c"}, "input[0].output"),
    ({"type": "item_reference", "id": "msg_1"}, "input[0]"),
])
def test_bad_items_are_refused_where_they_are(item, param):
    with pytest.raises(InvalidRequest) as err:
        ra.items_to_messages([item], ra.ToolNames())
    assert err.value.param == param


def test_store_forgets_the_oldest_but_keeps_a_chain_whole():
    store = ra.ResponseStore(capacity=2)
    first = ra.Stored({}, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], [])
    store.put("r1", first)
    second = ra.Stored({}, [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}], [], first)
    store.put("r2", second)
    store.put("r3", ra.Stored({}, [], []))
    with pytest.raises(ra.ResponseNotFound):
        store.get("r1")
    assert [m["content"] for m in store.get("r2").conversation()] == ["a", "b", "c", "d"]


# -- the event writer, without a model -------------------------------------------------------------
class _Done:
    def __init__(self, text="", reasoning="", tool_calls=()):
        self.text, self.reasoning, self.tool_calls = text, reasoning, list(tool_calls)


def _decoded(sse) -> tuple[str, dict]:
    data = json.loads(sse.data)
    assert sse.event == data["type"]
    return data["type"], data


def test_writer_opens_an_item_per_kind_and_numbers_every_event():
    names = ra.ToolNames(custom={"apply_patch"})
    w = ra.EventWriter(names)
    engine_events = [Event("reasoning", "Think"), Event("reasoning", "ing."), Event("text", "Hi"), Event("text", "!"),
                     Event("tool_call", "read", {"index": 0, "id": "c1", "name": "read"}),
                     Event("tool_args", "{\"p\":", {"index": 0, "id": "c1"}), Event("tool_args", " 1}", {"index": 0}),
                     Event("tool_call", "apply_patch", {"index": 1, "id": "c2", "name": "apply_patch"}),
                     Event("tool_args", "{\"input\": \"x\\ny\"}", {"index": 1, "id": "c2"})]
    out = [e for ev in engine_events for e in w.feed(ev)]
    calls = [{"id": "c1", "function": {"name": "read", "arguments": "{\"p\": 1}"}},
             {"id": "c2", "function": {"name": "apply_patch", "arguments": "{\"input\": \"x\\ny\"}"}}]
    out += w.finish(_Done("Hi!", "Thinking.", calls))
    decoded = [_decoded(e) for e in out]
    assert [d["sequence_number"] for _, d in decoded] == list(range(len(decoded)))
    assert [t for t, _ in decoded] == [
        "response.output_item.added", "response.reasoning_text.delta", "response.reasoning_text.delta",
        "response.reasoning_text.done", "response.output_item.done",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.delta", "response.output_text.done", "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done",
        "response.output_item.added", "response.custom_tool_call_input.delta", "response.custom_tool_call_input.done",
        "response.output_item.done"]
    done_items = [d["item"] for t, d in decoded if t == "response.output_item.done"]
    assert [d["output_index"] for t, d in decoded if t == "response.output_item.done"] == [0, 1, 2, 3]
    assert done_items == w.output()
    reasoning, message, call, custom = done_items
    assert reasoning["content"] == [{"type": "reasoning_text", "text": "Thinking."}]
    assert message["content"][0]["text"] == "Hi!"
    assert (call["type"], call["call_id"], call["name"], call["arguments"]) == ("function_call", "c1", "read",
                                                                                "{\"p\": 1}")
    assert (custom["type"], custom["call_id"], custom["input"]) == ("custom_tool_call", "c2", "x\ny")


def test_writer_never_finishes_a_call_the_engine_did_not_read_as_one():
    """A call cut off, or with arguments that are not an object, turns out to be text at the end:
    its item gets no done event (an agent runs a call when its item is done) and is not in the
    response; the text comes as a message."""
    w = ra.EventWriter(ra.ToolNames())
    engine_events = [Event("tool_call", "read", {"index": 0, "id": "c1", "name": "read"}),
                     Event("tool_args", "[1, 2", {"index": 0}), Event("text", "<tool_call>read [1, 2")]
    out = [e for ev in engine_events for e in w.feed(ev)] + w.finish(_Done("<tool_call>read [1, 2", "", []))
    decoded = [_decoded(e) for e in out]
    done_items = [d["item"]["type"] for t, d in decoded if t == "response.output_item.done"]
    assert done_items == ["message"]
    assert not [t for t, _ in decoded if t == "response.function_call_arguments.done"]
    assert [i["type"] for i in w.output()] == ["message"]


def test_writer_gives_an_empty_reply_its_message():
    w = ra.EventWriter(ra.ToolNames())
    types = [_decoded(e)[0] for e in w.finish(_Done())]
    assert types[0] == "response.output_item.added" and types[-1] == "response.output_item.done"
    assert w.output()[0]["content"][0]["text"] == ""


# -- the endpoint, with the openai client ----------------------------------------------------------
def test_text_reply_whole_and_streamed_agree(client):
    ask = dict(model=MODEL, input="Name three colours.", instructions=INSTRUCTIONS, temperature=0,
               max_output_tokens=24)
    whole = client.responses.create(**ask)
    assert whole.object == "response" and whole.id.startswith("resp_") and whole.model == MODEL
    assert whole.status in ("completed", "incomplete") and whole.output_text
    assert whole.usage.input_tokens > 0 and whole.usage.output_tokens > 0
    assert whole.instructions == INSTRUCTIONS

    events = events_of(client.responses.create(**ask, stream=True))
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert events[-1].response.status == whole.status
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert deltas == final.output_text == whole.output_text
    assert final.id == events[0].response.id and final.usage.output_tokens == whole.usage.output_tokens


def test_max_output_tokens_makes_the_response_incomplete(client):
    """Whole, and through the openai client's stream helper, which needs response.completed to end."""
    ask = dict(model=MODEL, input="Write a long story about a dragon.", temperature=0, max_output_tokens=5)
    r = client.responses.create(**ask)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 5
    with client.responses.stream(**ask) as s:
        for _ in s:
            pass
        streamed = s.get_final_response()
    assert streamed.status == "incomplete" and streamed.output_text == r.output_text


def test_previous_response_id_continues_from_the_session(client):
    """The second request sends only the new question: the conversation comes from the store, and
    the session that answered the first is found and kept, so only the new turn is read. A
    stateless client sending the same conversation as items gets the same prompt."""
    first = client.responses.create(model=MODEL, input="What is the capital of France?", instructions=INSTRUCTIONS,
                                    temperature=0, max_output_tokens=16)
    second = client.responses.create(model=MODEL, input="And of Italy?", previous_response_id=first.id,
                                     instructions=INSTRUCTIONS, temperature=0, max_output_tokens=8)
    assert second.previous_response_id == first.id
    assert second.model_extra["kvside"]["reused_messages"] == 3  # instructions, question, answer
    reused = second.usage.input_tokens_details.cached_tokens
    assert reused >= first.usage.input_tokens + first.usage.output_tokens - 2, (reused, first.usage)
    assert reused < second.usage.input_tokens

    items = [{"role": "user", "content": "What is the capital of France?"},
             *[o.model_dump(exclude_none=True) for o in first.output],
             {"role": "user", "content": "And of Italy?"}]
    stateless = client.responses.create(model=MODEL, input=items, instructions=INSTRUCTIONS, temperature=0,
                                        max_output_tokens=8, store=False)
    assert stateless.usage.input_tokens == second.usage.input_tokens
    assert stateless.output_text == second.output_text


def test_input_tokens_counts_what_a_fresh_session_reads(client, daemon_url):
    ask = dict(model=MODEL, input="How many tokens is this?", instructions=INSTRUCTIONS, tools=[WEATHER])
    counted = httpx.post(f"{daemon_url}/v1/responses/input_tokens", json=ask).json()
    r = client.responses.create(**ask, tool_choice="none", temperature=0, max_output_tokens=2, store=False)
    assert counted == {"object": "response.input_tokens", "input_tokens": r.usage.input_tokens}


def test_stored_responses_are_read_listed_and_deleted(client, daemon_url):
    r = client.responses.create(model=MODEL, input=[{"role": "user", "content": "Hello"}], temperature=0,
                                max_output_tokens=4, metadata={"ticket": "7"})
    got = client.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == r.output_text and got.metadata == {"ticket": "7"}
    listed = httpx.get(f"{daemon_url}/v1/responses/{r.id}/input_items").json()
    assert [(i["type"], i["role"], i["content"]) for i in listed["data"]] == [("message", "user", "Hello")]
    client.responses.delete(r.id)
    with pytest.raises(NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(BadRequestError) as err:
        client.responses.create(model=MODEL, input="more", previous_response_id=r.id)
    assert err.value.body["code"] == "previous_response_not_found"
    assert err.value.body["param"] == "previous_response_id"


def test_store_false_keeps_nothing(client):
    r = client.responses.create(model=MODEL, input="Hi", temperature=0, max_output_tokens=2, store=False)
    assert r.store is False
    with pytest.raises(NotFoundError):
        client.responses.retrieve(r.id)


def test_forced_function_call_streams_its_arguments_and_its_output_continues(client):
    events = events_of(client.responses.create(
        model=MODEL, input="What is the weather in Paris for the next 3 days?", tools=[WEATHER],
        tool_choice={"type": "function", "name": "get_weather"}, temperature=0, max_output_tokens=80, stream=True))
    added = [e for e in events if e.type == "response.output_item.added"]
    assert [a.item.type for a in added] == ["function_call"]
    assert added[0].item.name == "get_weather" and added[0].item.call_id.startswith("call_")
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    (args_done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(deltas) > 1 and "".join(deltas) == args_done.arguments
    args = json.loads(args_done.arguments)
    assert isinstance(args["city"], str) and isinstance(args["days"], int)
    final = events[-1].response
    (call,) = final.output
    assert call.type == "function_call" and call.arguments == args_done.arguments

    result = client.responses.create(
        model=MODEL, previous_response_id=final.id, tools=[WEATHER], temperature=0, max_output_tokens=8,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C all week."}])
    assert result.model_extra["kvside"]["reused_messages"] == 2  # the question and the call
    assert result.usage.input_tokens_details.cached_tokens >= final.usage.input_tokens


def test_forced_custom_tool_call_returns_its_input_as_text(client):
    r = client.responses.create(model=MODEL, input="Add a README to the repository.", tools=[WEATHER, PATCH],
                                tool_choice={"type": "custom", "name": "apply_patch"}, temperature=0,
                                max_output_tokens=80)
    (call,) = r.output
    assert call.type == "custom_tool_call" and call.name == "apply_patch" and isinstance(call.input, str)


def test_namespaced_tools_come_back_with_their_namespace(client):
    tools = [{"type": "namespace", "name": "agents", "description": "Sub-agents", "tools": [
        {"type": "function", "name": "spawn", "parameters": {
            "type": "object", "properties": {"task": {"type": "string", "maxLength": 30}}, "required": ["task"]}}]}]
    r = client.responses.create(model=MODEL, input="Start an agent that writes tests.", tools=tools,
                                tool_choice={"type": "function", "name": "spawn", "namespace": "agents"},
                                temperature=0, max_output_tokens=120)
    (call,) = r.output
    assert (call.type, call.name, call.namespace) == ("function_call", "spawn", "agents")
    assert isinstance(json.loads(call.arguments)["task"], str)


def test_hosted_tools_are_left_out_and_said_so(client):
    """Codex offers web search by default: the request is answered with the client's own tools,
    and the response lists what the model was not told of."""
    r = client.responses.create(model=MODEL, input="What is the weather in Paris for the next 3 days?",
                                tools=[{"type": "web_search", "external_web_access": False}, WEATHER],
                                tool_choice="required", parallel_tool_calls=False, temperature=0,
                                max_output_tokens=80)
    (call,) = r.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert r.model_extra["kvside"]["tools_ignored"] == ["web_search"]


def test_text_format_json_schema_is_followed(client):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    r = client.responses.create(model=MODEL, input="Describe a person.", temperature=0, max_output_tokens=60,
                                text={"format": {"type": "json_schema", "name": "person", "schema": schema,
                                                 "strict": True}})
    value = json.loads(r.output_text)
    assert set(value) == {"name", "age"} and isinstance(value["age"], int)
    assert r.text.format.type == "json_schema"


@pytest.mark.parametrize("fields, param", [
    (dict(input="x", tools=[{"type": "a_tool_nobody_made"}]), "tools[0].type"),
    (dict(input="x", tools=[{"type": "web_search"}], tool_choice={"type": "function", "name": "web_search"}),
     "tool_choice"),
    (dict(input="x", tool_choice="required"), "tool_choice"),
    (dict(input=[{"type": "message", "role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]),
     "input[0].content[0]"),
    (dict(input=7), "input"),
    (dict(input=[]), "input"),
    (dict(input="x", background=True), "background"),
    (dict(input="x", text={"format": {"type": "yaml"}}), "text.format"),
    (dict(input="x", text="json"), "text"),
    (dict(input="x", text={"format": {"type": "json_schema", "schema": "nope"}}), "text.format.schema"),
    (dict(input="x", max_output_tokens="9"), "max_output_tokens"),
])
def test_bad_requests_are_clear_400s(daemon_url, fields, param):
    r = httpx.post(f"{daemon_url}/v1/responses", json={"model": MODEL, **fields})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_unknown_response_ids_are_404s(daemon_url):
    for method in ("GET", "DELETE"):
        r = httpx.request(method, f"{daemon_url}/v1/responses/resp_nothing")
        assert r.status_code == 404 and "resp_nothing" in r.json()["error"]["message"]


# -- reasoning, on a template whose generation prompt opens a think block ---------------------------
TEMPLATE = Path(__file__).parent / "data" / "drops_reasoning.jinja"


@pytest.fixture(scope="module")
def reasoning_client(tmp_path_factory):
    with Engine(n_ctx=512, max_sessions=2, n_threads=2, chat_template=str(TEMPLATE),
                sessions_dir=str(tmp_path_factory.mktemp("reasoning"))) as e:
        live = LiveDaemon(e)
        yield OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
        live.stop()


def test_reasoning_is_an_item_of_its_own(reasoning_client):
    ask = dict(model=MODEL, input="What is the capital of France?", temperature=0, max_output_tokens=12)
    events = events_of(reasoning_client.responses.create(**ask, stream=True))
    deltas = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    final = events[-1].response
    reasoning = final.output[0]
    assert reasoning.type == "reasoning" and reasoning.content[0].text == deltas and deltas
    assert 0 < final.usage.output_tokens_details.reasoning_tokens <= final.usage.output_tokens
    whole = reasoning_client.responses.create(**ask)
    assert whole.output[0].content[0].text == deltas

    # sent back as an item, the reasoning is the assistant turn's: the template drops it once the
    # user speaks again, and the session is edited to match
    items = [{"role": "user", "content": "What is the capital of France?"},
             *[o.model_dump(exclude_none=True) for o in final.output],
             {"role": "user", "content": "And of Italy?"}]
    nxt = reasoning_client.responses.create(model=MODEL, input=items, temperature=0, max_output_tokens=4)
    assert nxt.usage.input_tokens_details.cached_tokens > 0


# -- stored responses on disk --------------------------------------------------------------------------
def _stored(text: str, parent=None) -> ra.Stored:
    return ra.Stored({"id": "x", "output": []}, [{"role": "user", "content": text},
                                                 {"role": "assistant", "content": text.upper()}], [], parent)


def test_a_stored_response_outlives_its_store(tmp_path):
    """A new store on the same folder (the daemon restarted) reads the whole conversation from one
    file; a deleted response is gone from both; names that are not response ids never reach the disk."""
    store = ra.ResponseStore(folder=tmp_path)
    first = _stored("a")
    rid1, rid2 = "resp_" + "1" * 32, "resp_" + "2" * 32
    store.put(rid1, first)
    store.write(rid1, first)
    second = _stored("b", first)
    store.put(rid2, second)
    store.write(rid2, second)
    again = ra.ResponseStore(folder=tmp_path)
    assert [m["content"] for m in again.get(rid2).conversation()] == ["a", "A", "b", "B"]
    again.delete(rid2)
    assert not (tmp_path / f"{rid2}.json").exists()
    with pytest.raises(ra.ResponseNotFound):
        ra.ResponseStore(folder=tmp_path).get(rid2)
    (tmp_path.parent / "secret.json").write_text("{}")
    for name in ("../secret", "resp_../../secret", "resp_" + "1" * 31):
        with pytest.raises(ra.ResponseNotFound):
            again.get(name)


def test_the_folder_keeps_only_the_newest_and_a_damaged_file_is_a_clear_error(tmp_path):
    import os

    store = ra.ResponseStore(capacity=3, folder=tmp_path)
    ids = [f"resp_{i:032x}" for i in range(5)]
    for i, rid in enumerate(ids):
        stored = _stored(str(i))
        store.put(rid, stored)
        store.write(rid, stored)
        os.utime(tmp_path / f"{rid}.json", ns=(i * 10**9, i * 10**9))
    store._prune()
    assert sorted(p.stem for p in tmp_path.glob("resp_*.json")) == ids[2:]
    (tmp_path / f"{ids[4]}.json").write_text("{not json")
    with pytest.raises(KvsideError) as err:
        ra.ResponseStore(folder=tmp_path).get(ids[4])
    assert ids[4] in err.value.message and (tmp_path / f"{ids[4]}.json").exists()


def test_a_conversation_continues_after_the_daemon_restarts(tmp_path):
    """Codex continues with previous_response_id; the daemon was restarted meanwhile. The
    conversation comes from the stored response's file and the cache from the session's file."""
    def serve():
        return Engine(n_ctx=512, max_sessions=2, n_threads=2, persist=True, sessions_dir=str(tmp_path))

    with serve() as e:
        live = LiveDaemon(e)
        c = OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
        first = c.responses.create(model=MODEL, input="What is the capital of France?", instructions=INSTRUCTIONS,
                                   temperature=0, max_output_tokens=12)
        path = tmp_path / "responses" / f"{first.id}.json"
        for _ in range(100):  # written off the event loop
            if path.exists():
                break
            time.sleep(0.05)
        live.stop()
    assert path.exists()
    with serve() as e:
        live = LiveDaemon(e)
        c = OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
        assert c.responses.retrieve(first.id).output_text == first.output_text
        second = c.responses.create(model=MODEL, input="And of Italy?", previous_response_id=first.id,
                                    instructions=INSTRUCTIONS, temperature=0, max_output_tokens=4)
        live.stop()
    assert second.model_extra["kvside"].get("reused_messages") == 3, second.model_extra
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens
