"""Tools, structured output and logprobs over /v1 with the official `openai` client, on the
default SmolLM2 model: it cannot be trusted to choose a tool, so these are the forced and
grammar paths (tool_choice required or named, response_format), which must hold on any model."""

import json

import httpx
import pytest
from openai import OpenAI

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"}, "days": {"type": "integer"}},
                                                "required": ["city", "days"]}}}
SEARCH = {"type": "function", "function": {"name": "search", "parameters": {
    "type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}}
MODEL = "smollm2-135m"
ASK = [{"role": "user", "content": "What is the weather in Paris for the next 3 days?"}]


@pytest.fixture(scope="module")
def client(daemon_url):
    return OpenAI(base_url=daemon_url + "/v1", api_key="unused", max_retries=0)


def test_required_tool_choice_returns_a_valid_call(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, SEARCH], tool_choice="required",
                                       parallel_tool_calls=False, temperature=0, max_tokens=80)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    schema = {"get_weather": {"city": str, "days": int}, "search": {"q": str}}[call.function.name]
    assert set(args) == set(schema) and all(isinstance(args[k], t) for k, t in schema.items())


def test_named_tool_choice_streams_openai_deltas(client):
    """First chunk of a call: index, id, type, function.name; then argument fragments only."""
    stream = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER, SEARCH], parallel_tool_calls=False,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=0, max_tokens=80,
        stream=True)
    calls, finish = [], None
    for chunk in stream:
        if not chunk.choices:
            continue
        finish = chunk.choices[0].finish_reason or finish
        for tc in chunk.choices[0].delta.tool_calls or []:
            calls.append(tc)
    assert finish == "tool_calls"
    first, rest = calls[0], calls[1:]
    assert first.index == 0 and first.id.startswith("call_") and first.type == "function"
    assert first.function.name == "get_weather"
    assert rest and all(tc.id is None and tc.function.name is None and tc.index == 0 for tc in rest)
    args = json.loads("".join(tc.function.arguments or "" for tc in calls))
    assert isinstance(args["city"], str) and isinstance(args["days"], int)


def test_round_trip_with_a_tool_result_reuses_the_cache(client):
    """The client resends the call (content null, arguments re-serialised) and a tool result:
    the session that made the call is matched and only the new turn is read."""
    tools = [WEATHER]
    first = client.chat.completions.create(model=MODEL, messages=ASK, tools=tools, tool_choice="required",
                                           temperature=0, max_tokens=80, parallel_tool_calls=False)
    call = first.choices[0].message.tool_calls[0]
    reformatted = json.dumps(json.loads(call.function.arguments), indent=2)
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": reformatted}}]},
        {"role": "tool", "tool_call_id": call.id, "content": [{"type": "text", "text": "Sunny, 21 C all week."}]},
    ]
    second = client.chat.completions.create(model=MODEL, messages=history, tools=tools, temperature=0, max_tokens=20)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens, (cached, first.usage.prompt_tokens)
    assert second.model_extra["kvside"]["reused_messages"] == 2


def test_other_tools_rewrite_the_tool_turn_of_the_session_in_place(client):
    """Tool definitions are part of the cached prompt: a request with another set of tools is never
    answered from the cells of the first set. The session that holds the conversation has its tool
    turn rewritten token by token (test_diff_binding checks the tokens equal a fresh rendering), when
    that costs less than reading the conversation again: here a long tool result follows."""
    a = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required",
                                       temperature=0, max_tokens=60, parallel_tool_calls=False)
    call = a.choices[0].message.tool_calls[0]
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C, light wind. " * 22}]
    client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], temperature=0, max_tokens=2)
    history += [{"role": "assistant", "content": "It is sunny."}, {"role": "user", "content": "And tomorrow?"}]
    b = client.chat.completions.create(model=MODEL, messages=history, tools=[SEARCH], temperature=0, max_tokens=5)
    facts = b.model_extra["kvside"]
    assert facts["session"] == a.model_extra["kvside"]["session"] and facts.get("tools_changed") is True
    assert facts["inserted_tokens"] > 0
    cached = b.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < b.usage.prompt_tokens


def test_json_schema_response_follows_the_schema(client):
    # bounded, so the answer ends inside max_tokens whatever the model's taste for long lists
    # (unbounded, SmolLM2 on some CPUs lists tags until the tokens run out)
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer"},
                                               "tags": {"type": "array", "maxItems": 3,
                                                        "items": {"type": "string", "maxLength": 24}}},
              "required": ["name", "age", "tags"], "additionalProperties": False}
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Describe a person."}], temperature=0, max_tokens=120,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}})
    value = json.loads(r.choices[0].message.content)
    assert set(value) == {"name", "age", "tags"}
    assert isinstance(value["name"], str) and isinstance(value["age"], int)
    assert all(isinstance(t, str) and len(t) <= 24 for t in value["tags"]) and len(value["tags"]) <= 3


def test_json_object_response_is_an_object(client):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Reply with a JSON object whose key 'colour' names a colour."}],
        response_format={"type": "json_object"}, temperature=0, max_tokens=200)
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_chat_logprobs_whole_and_streamed(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Say hello."}], temperature=0, max_tokens=6,
                  logprobs=True, top_logprobs=3, extra_body={"repeat_penalty": 1.0})
    r = client.chat.completions.create(**kwargs)
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens
    for e in entries:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert e.token == e.top_logprobs[0].token and e.logprob == pytest.approx(e.top_logprobs[0].logprob)
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob
    assert "".join(e.token for e in entries).strip() == r.choices[0].message.content.strip()
    # streamed (the second request shares the first one's cells: rounding may pick another token
    # on a near tie, so the stream is checked on its own terms)
    streamed, text = [], ""
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            if chunk.choices[0].logprobs:
                streamed += chunk.choices[0].logprobs.content
    assert len(streamed) >= len(entries) - 1
    for e in streamed:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3 and e.token == e.top_logprobs[0].token
    assert "".join(e.token for e in streamed).strip() == text.strip()


def test_completion_logprobs_legacy_shape(client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", logprobs=2, temperature=0,
                                  max_tokens=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    assert lp.text_offset[0] == 0 and all(len(t) == 2 for t in lp.top_logprobs)
    assert "".join(lp.tokens) == r.choices[0].text


@pytest.mark.parametrize("extra,why", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among the tools"),
    ({"tool_choice": "required"}, "needs tools"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "function name"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "schema"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 2}, "needs 'logprobs'"),
    ({"parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]}, "text only"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": "x"}, {"role": "user", "content": "x"}]},
     "tool_calls"),
])
def test_bad_agent_requests_are_clear_400s(daemon_url, extra, why):
    body = {"model": MODEL, "messages": ASK, "max_tokens": 4, **extra}
    r = httpx.post(daemon_url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert why in r.json()["error"]["message"]


def test_what_clients_add_is_accepted(client):
    """Content arrays in every role, unknown fields (prompt_cache_key, copilot_cache_control,
    user, metadata, store, service_tier), n=1, reasoning_effort."""
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief.", "copilot_cache_control": {"type": "ephemeral"}}]},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": " there"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello."}], "reasoning_content": "greeting"},
        {"role": "user", "content": "Again?"},
    ]
    r = client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=5, n=1, temperature=0, user="u1", store=False,
        reasoning_effort="low", service_tier="auto", metadata={"k": "v"},
        extra_body={"prompt_cache_key": "abc", "copilot_cache_control": {"type": "ephemeral"}})
    assert r.choices[0].message.content is not None


@pytest.mark.parametrize("mode", ["TOOLS", "JSON_SCHEMA"])
def test_instructor_structured_output(client, mode):
    """instructor's tool mode (a forced named call) and its json_schema mode, into a pydantic model."""
    import instructor
    from pydantic import BaseModel

    class City(BaseModel):
        name: str
        population: int

    structured = instructor.from_openai(client, mode=getattr(instructor.Mode, mode))
    city = structured.chat.completions.create(
        model=MODEL, response_model=City, max_retries=0, temperature=0, max_tokens=80,
        messages=[{"role": "user", "content": "Paris has 2 million people. Extract the city."}])
    assert isinstance(city, City) and city.name and isinstance(city.population, int)


def test_dropping_the_turn_that_carries_the_tools_is_a_new_session_not_an_error(client):
    """Without a system prompt the first user turn carries the tool definitions (the template puts
    them there) and is pinned; a client that trims it from the front gets a fresh prefill, not a
    refused edit."""
    history = [{"role": "user", "content": "Weather in Oslo for 2 days?"}]
    first = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], tool_choice="required",
                                           parallel_tool_calls=False, temperature=0, max_tokens=60)
    call = first.choices[0].message.tool_calls[0]
    history += [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                {"role": "tool", "tool_call_id": call.id, "content": "rain"}]
    second = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], temperature=0,
                                            max_tokens=8)
    history += [{"role": "assistant", "content": second.choices[0].message.content or "ok"},
                {"role": "user", "content": "Thanks."}]
    trimmed = client.chat.completions.create(model=MODEL, messages=history[1:], tools=[WEATHER], temperature=0,
                                             max_tokens=4)
    assert trimmed.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # a new session: only the tokens before the first user turn (the tool definitions) are shared
    facts = trimmed.model_extra["kvside"]
    assert "reused_messages" not in facts
    assert trimmed.usage.prompt_tokens_details.cached_tokens == facts.get("shared_tokens", 0)
