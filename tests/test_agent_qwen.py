"""Tool calling on a model that chooses tools (Qwen2.5-Coder-0.5B-Instruct, its own template),
with the `openai` client and langchain-openai. Few and short: CI has two cores."""

import json

import pytest
from openai import OpenAI

from conftest import QWEN

pytestmark = pytest.mark.qwen

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]


@pytest.fixture(scope="module")
def client(qwen_url):
    return OpenAI(base_url=qwen_url + "/v1", api_key="unused", max_retries=0)


def test_model_chooses_the_tool_and_streams_the_call(client):
    stream = client.chat.completions.create(model=QWEN, messages=ASK, tools=[WEATHER], temperature=0,
                                            max_tokens=60, stream=True, stream_options={"include_usage": True})
    deltas, finish, content = [], None, ""
    for chunk in stream:
        if chunk.choices:
            finish = chunk.choices[0].finish_reason or finish
            content += chunk.choices[0].delta.content or ""
            deltas += chunk.choices[0].delta.tool_calls or []
    assert finish == "tool_calls" and content == ""
    assert deltas[0].function.name == "get_weather" and deltas[0].id
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == {"city": "Paris"}


def test_round_trip_answers_from_the_tool_result_on_the_same_cache(client):
    first = client.chat.completions.create(model=QWEN, messages=ASK, tools=[WEATHER], temperature=0, max_tokens=60)
    call = first.choices[0].message.tool_calls[0]
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
    history = ASK + [first.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 18, "sky": "sunny"}'}]
    second = client.chat.completions.create(model=QWEN, messages=history, tools=[WEATHER], temperature=0,
                                            max_tokens=40, tool_choice="none")
    assert second.choices[0].message.tool_calls is None
    assert second.choices[0].message.content
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens


def test_langchain_bind_tools(qwen_url):
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """Get the current weather for a city."""
        return "sunny"

    llm = ChatOpenAI(base_url=qwen_url + "/v1", api_key="unused", model=QWEN, temperature=0, max_retries=0)
    reply = llm.bind_tools([get_weather]).invoke("What is the weather in Paris right now?")
    assert reply.tool_calls and reply.tool_calls[0]["name"] == "get_weather"
    assert reply.tool_calls[0]["args"] == {"city": "Paris"}


def test_ollama_chat_with_tools_sends_each_call_whole(qwen_url):
    """Ollama's shape: the call in one chunk, arguments as an object; the round trip with a tool
    result (Ollama's history carries no call ids) is answered on the same cache."""
    import httpx
    import ollama

    client = ollama.Client(host=qwen_url)
    assert {"tools", "insert"} <= set(client.show(QWEN).capabilities)
    caps = httpx.get(qwen_url + "/props").json()["chat_template_caps"]
    assert caps["supports_tools"] and caps["supports_tool_calls"]
    chunks = list(client.chat(model=QWEN, messages=ASK, tools=[WEATHER], stream=True,
                              options={"temperature": 0, "num_predict": 60}))
    calls = [c for chunk in chunks for c in (chunk.message.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    assert calls[0].function.arguments == {"city": "Paris"}
    assert chunks[-1].done and chunks[-1].done_reason == "stop"
    history = ASK + [{"role": "assistant", "content": "", "tool_calls": [{"function": {
        "name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "18 C and sunny", "tool_name": "get_weather"}]
    second = client.chat(model=QWEN, messages=history, tools=[WEATHER], stream=False,
                         options={"temperature": 0, "num_predict": 30})
    assert second.done
    assert second.prompt_eval_count < 40  # only the tool result and the new turn were read


def test_llama_vscode_infill_shape(qwen_url):
    """llama.vscode's /infill body (input_extra, n_indent, samplers, t_max_*), and its n_predict 0
    warm-up, on a model with FIM tokens."""
    import httpx

    from test_editor_replays import load

    body = load("llama_vscode_infill", QWEN)
    r = httpx.post(qwen_url + "/infill", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert isinstance(r.json()["content"], str)
    warm = httpx.post(qwen_url + "/infill", json=dict(body, n_predict=0), timeout=120)
    assert warm.status_code == 200 and warm.json()["content"] == "", warm.text
    bad = httpx.post(qwen_url + "/infill", json=dict(body, input_extra=[{"filename": "a.py"}]), timeout=30)
    assert bad.status_code == 400 and "input_extra" in bad.json()["error"]["message"]


def test_infill_keeps_the_context_chunks_when_they_rotate(qwen_url):
    """llama.vscode's ring of context chunks: the oldest leaves, a new one comes after the others.
    The chunks still sent are not read again (moved into place), only the new chunk and the cursor's
    surroundings are."""
    import httpx

    files = {f"mod{i}.py": "".join(f"def helper_{i}_{k}(value):\n    return value * {k} + {i}\n\n" for k in range(12))
             for i in range(5)}
    names = list(files)

    def body(ring, line):
        return {"input_extra": [{"filename": n, "text": files[n]} for n in ring],
                "input_prefix": "import os\n\n\ndef main():\n", "input_suffix": "\n    return 0\n",
                "prompt": line, "n_predict": 4, "temperature": 0}

    first = httpx.post(qwen_url + "/infill", json=body(names[0:3], "    x = "), timeout=120).json()
    assert first["timings"]["cache_n"] == 0 or first["kvside"]["prefix_tokens"] == first["timings"]["cache_n"]
    rotated = httpx.post(qwen_url + "/infill", json=body(names[1:4], "    x = "), timeout=120).json()
    facts = rotated["kvside"]
    chunk = rotated["tokens_evaluated"] // 4  # about one chunk's worth
    assert facts["moved_runs"] >= 1 and facts["moved_tokens"] >= chunk
    assert facts["recomputed_tokens"] == 16 * facts["moved_runs"]  # the default repair
    assert rotated["timings"]["cache_n"] == facts["prefix_tokens"] + facts["moved_tokens"] - facts["recomputed_tokens"]
    assert rotated["timings"]["prompt_n"] < rotated["tokens_evaluated"] // 2
    assert isinstance(rotated["content"], str)


def test_infill_prompt_is_laid_out_as_llama_servers(qwen_url):
    """[REP]myproject\\n [SEP]name\\n chunk [SEP]filename\\n [PRE]prefix typed [SUF]suffix [MID], each
    text tokenized on its own as llama-server's format_prompt_infill does: the token count says so."""
    import httpx

    def count(text):
        return len(httpx.post(qwen_url + "/tokenize", json={"content": text, "parse_special": False}).json()["tokens"])

    chunk = {"filename": "util.py", "text": "def double(x):\n    return 2 * x\n"}
    prefix, typed, suffix = "import util\n\n\ndef main():\n", "    y = util.", "\n    return y\n"
    r = httpx.post(qwen_url + "/infill", json={"input_extra": [chunk], "input_prefix": prefix, "prompt": typed,
                                               "input_suffix": suffix, "n_predict": 0}, timeout=120).json()
    specials = 6  # repo name, two file separators, prefix, suffix, middle
    expected = (specials + count("myproject\n") + count("util.py\n") + count(chunk["text"]) + count("filename\n")
                + count(prefix) + count(typed) + count(suffix))
    assert r["tokens_evaluated"] == expected


def test_ollama_generate_with_suffix_fills_the_middle(qwen_url):
    import ollama

    client = ollama.Client(host=qwen_url)
    r = client.generate(model="qwen2.5-coder-0.5b", prompt="def add(a, b):\n    ", suffix="\n\nprint(add(1, 2))\n",
                        options={"temperature": 0, "num_predict": 12})
    assert "a + b" in r.response or "return" in r.response
    assert r.done and r.prompt_eval_count > 10


def test_infill_stops_at_a_dedent_with_n_indent(qwen_url):
    import httpx

    body = {"input_prefix": "def area(w, h):\n", "prompt": "    ", "input_suffix": "\n\n\nprint(area(2, 3))\n",
            "n_predict": 48, "temperature": 0, "n_indent": 4}
    r = httpx.post(qwen_url + "/infill", json=body, timeout=120).json()
    for line in r["content"].split("\n")[1:]:
        assert not line.strip() or line.startswith("    "), r["content"]
    bad = httpx.post(qwen_url + "/infill", json=dict(body, n_indent=-1), timeout=30)
    assert bad.status_code == 400 and "n_indent" in bad.json()["error"]["message"]


def test_responses_api_agent_loop_as_codex_sends_it(client):
    """Codex's request shape on /v1/responses: instructions, input items, function and custom tools,
    web search offered by default, streamed; the model chooses the call, and the tool's output goes
    back with previous_response_id and only the new item, answered on the same cache."""
    tools = [{"type": "function", "name": WEATHER["function"]["name"],
              "description": WEATHER["function"]["description"], "strict": False,
              "parameters": WEATHER["function"]["parameters"]},
             {"type": "custom", "name": "apply_patch", "description": "Edit files with a patch"},
             {"type": "web_search", "external_web_access": False}]
    shape = dict(model=QWEN, instructions="You are a coding agent. Use tools when they help.", tools=tools,
                 tool_choice="auto", parallel_tool_calls=False, store=True, temperature=0, max_output_tokens=60,
                 reasoning={"effort": "medium", "summary": "auto"}, include=["reasoning.encrypted_content"],
                 prompt_cache_key="thread-1", text={"verbosity": "medium"})
    events = list(client.responses.create(
        **shape, stream=True,
        input=[{"type": "message", "role": "user", "content": [{"type": "input_text", "text": ASK[0]["content"]}]}]))
    done = [e.item for e in events if e.type == "response.output_item.done"]
    assert [i.type for i in done] == ["function_call"]
    assert (done[0].name, json.loads(done[0].arguments)) == ("get_weather", {"city": "Paris"})
    first = events[-1].response
    assert events[-1].type == "response.completed" and first.output[0].call_id == done[0].call_id

    # tool_choice none: a message, not another call (the 0.5B model, here as over /v1/chat/completions,
    # tends to write the call again, as text once calls are off)
    second = client.responses.create(**dict(shape, tool_choice="none"), previous_response_id=first.id, input=[
        {"type": "function_call_output", "call_id": done[0].call_id, "output": '{"temperature_c": 18, "sky": "sunny"}'}])
    assert [o.type for o in second.output] == ["message"] and second.output_text
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens


def test_anthropic_messages_agent_loop_as_claude_code_sends_it(qwen_url):
    """Claude Code's shape on /v1/messages: system blocks with cache_control, tools with
    input_schema, streamed; the model chooses the call, and the tool_result turn is read on the
    same cache (cache_read_input_tokens)."""
    import anthropic

    client = anthropic.Anthropic(base_url=qwen_url, api_key="unused", max_retries=0)
    tools = [{"name": "get_weather", "description": WEATHER["function"]["description"],
              "input_schema": {"$schema": "http://json-schema.org/draft-07/schema#",
                               **WEATHER["function"]["parameters"], "additionalProperties": False}}]
    shape = dict(model=QWEN, max_tokens=60, tools=tools, extra_body={"temperature": 0},
                 system=[{"type": "text", "text": "You are a coding agent. Use tools when they help.",
                          "cache_control": {"type": "ephemeral"}}])
    ask = [{"role": "user", "content": [{"type": "text", "text": ASK[0]["content"]}]}]
    with client.messages.stream(**shape, messages=ask) as s:
        first = s.get_final_message()
    assert first.stop_reason == "tool_use"
    (use,) = [b for b in first.content if b.type == "tool_use"]
    assert (use.name, use.input) == ("get_weather", {"city": "Paris"})
    second = client.messages.create(**shape, tool_choice={"type": "none"}, messages=ask + [
        {"role": "assistant", "content": first.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                      "content": '{"temperature_c": 18, "sky": "sunny"}'}]}])
    assert second.stop_reason in ("end_turn", "max_tokens") and second.content[0].type == "text"
    read_before = first.usage.input_tokens + first.usage.cache_read_input_tokens
    assert second.usage.cache_read_input_tokens >= read_before
