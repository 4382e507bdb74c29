"""Request bodies in the shapes editors send (tests/data/editors, each naming the source file it
follows), replayed against kvside; the answers are read the way those clients read them. A
second request in the same conversation must be served from the cache the first one left."""

import json
from pathlib import Path

import httpx
import pytest

from conftest import LiveDaemon
from kvside.engine import Engine

DATA = Path(__file__).parent / "data" / "editors"
CHAT_SHAPES = ["zed", "continue", "cline", "copilot", "llama_vscode_chat"]
FINISH = {"stop", "length", "tool_calls"}


def load(name: str, model: str) -> dict:
    recorded = json.loads((DATA / f"{name}.json").read_text())
    return {**recorded["body"], "model": model}


def read_answer(response: httpx.Response, stream: bool) -> dict:
    """What a client keeps of an answer: the message (content, tool calls accumulated by index,
    reasoning), the finish reason and the usage."""
    assert response.status_code == 200, response.text
    if not stream:
        body = response.json()
        choice = body["choices"][0]
        assert choice["finish_reason"] in FINISH
        return {"message": choice["message"], "finish": choice["finish_reason"], "usage": body["usage"]}
    content, reasoning, calls, finish, usage = "", "", {}, None, None
    lines = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    for raw in lines[:-1]:
        chunk = json.loads(raw)
        assert chunk["object"] == "chat.completion.chunk"
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk["choices"]:
            delta = choice["delta"]
            assert isinstance(delta, dict)
            content += delta.get("content") or ""
            reasoning += delta.get("reasoning_content") or ""
            for tc in delta.get("tool_calls") or []:
                entry = calls.setdefault(tc["index"], {"id": None, "name": "", "arguments": ""})
                entry["id"] = tc.get("id") or entry["id"]
                fn = tc.get("function") or {}
                entry["name"] += fn.get("name") or ""
                entry["arguments"] += fn.get("arguments") or ""
            finish = choice["finish_reason"] or finish
    assert finish in FINISH
    message = {"role": "assistant", "content": content or None}
    if calls:
        message["tool_calls"] = [{"id": c["id"], "type": "function",
                                  "function": {"name": c["name"], "arguments": c["arguments"]}}
                                 for _, c in sorted(calls.items())]
        for i, c in enumerate(message["tool_calls"]):
            assert c["id"] and c["function"]["name"]
            if finish == "length" and i == len(message["tool_calls"]) - 1:
                # cut at max_tokens mid-call: its arguments are half written, as OpenAI's are; the
                # text of the call also came as content (what a whole reply gives for it)
                assert c["function"]["arguments"].strip("{ ") in content or not c["function"]["arguments"]
                continue
            json.loads(c["function"]["arguments"])
    return {"message": message, "finish": finish, "usage": usage}


@pytest.mark.parametrize("name", CHAT_SHAPES)
def test_editor_chat_shapes_are_answered_and_the_next_turn_is_a_cache_hit(daemon_url, name):
    body = load(name, "smollm2-135m")
    first = httpx.post(daemon_url + "/v1/chat/completions", json=body, timeout=120)
    answer = read_answer(first, body.get("stream", False))
    assert answer["usage"]["completion_tokens"] > 0  # every shape here asks for usage (or is not streamed)
    follow = dict(body, messages=body["messages"] + [answer["message"], {"role": "user", "content": "Thanks."}])
    second = read_answer(httpx.post(daemon_url + "/v1/chat/completions", json=follow, timeout=120),
                         body.get("stream", False))
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    if answer["finish"] == "length" and answer["message"].get("tool_calls"):
        # a reply cut mid-call comes back as the client kept it (the half call, and its text as
        # content), not as the model wrote it: that turn is rewritten from its header on
        assert cached >= answer["usage"]["prompt_tokens"] - 8
    else:
        assert cached >= answer["usage"]["prompt_tokens"]


def test_usage_says_what_binding_edited(daemon_url):
    """A client that changes its system prompt (a clock) between turns: the reply's usage carries
    kvside's account of the edit (streamed and not)."""
    from openai import OpenAI

    client = OpenAI(base_url=daemon_url + "/v1", api_key="unused", max_retries=0)
    history = [{"role": "system", "content": "Time 10:01. Be brief."}, {"role": "user", "content": "Hi."}]
    first = client.chat.completions.create(model="smollm2-135m", messages=history, max_tokens=4, temperature=0)
    history += [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "Again."}]
    history[0] = {"role": "system", "content": "Time 10:02. Be brief."}
    chunks = list(client.chat.completions.create(model="smollm2-135m", messages=history, max_tokens=4, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    usage = chunks[-1].usage.model_extra["kvside"]
    assert usage["edited_messages"] == [0] and 0 < usage["inserted_tokens"] <= 3
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 3


@pytest.fixture(scope="module")
def wide_daemon_url(tmp_path_factory):
    with Engine(n_ctx=2048, max_sessions=2, n_threads=2, sessions_dir=str(tmp_path_factory.mktemp("wide"))) as e:
        live = LiveDaemon(e)
        yield live.url
        live.stop()


@pytest.mark.parametrize("client", ["cline", "placeholder", "edit", "tools", "shared", "regenerate"])
def test_bench_serve_client_modes_reuse_what_the_client_kept(daemon_url, wide_daemon_url, client):
    """`kvside bench serve --client` at toy size against this daemon: once the client drops (cline),
    elides (placeholder), edits its task message (edit) or its tools (tools), or asks for another
    reply (regenerate), the next turns still come from the cache; two agents with the same system prompt and tools (shared) each keep theirs,
    and the second one's first turn reuses the first one's system prompt."""
    from kvside.bench.serve import agent_run

    turns = 8 if client == "shared" else 5
    # tool definitions take ~400 tokens of the client's budget: those clients get a wider window
    # and budget, or they would keep nothing but the task message and the newest tool output
    wide = client in ("tools", "shared")
    rows = list(agent_run(wide_daemon_url if wide else daemon_url, turns=turns, budget_chars=3000 if wide else 1500,
                          max_tokens=4, client=client, explicit=False))
    # the first turn may share the system prompt with an earlier conversation, nothing more (a
    # regenerate's figures are those of the second reply to the turn)
    assert len(rows) == turns
    assert client == "regenerate" or rows[0]["cached_tokens"] < 0.5 * rows[0]["prompt_tokens"]
    for late in rows[-2:]:
        assert late["cached_tokens"] > 0.5 * late["prompt_tokens"], rows
    if client == "cline":
        assert any(r["dropped_exchanges"] for r in rows)
    if client == "regenerate":  # each turn asked again: only the generation prompt is read
        assert all(r["prompt_tokens"] - r["cached_tokens"] <= 4 for r in rows), rows
    if client == "shared":
        assert rows[1]["agent"] == 1 and rows[1]["cached_tokens"] > 0.5 * rows[1]["prompt_tokens"], rows


def test_bench_serve_pairs_late_turns_of_the_same_prompt_length():
    from kvside.bench.serve import paired_difference

    ours = [{"turn": t, "ttft_s": s, "prompt_tokens": n} for t, s, n in
            [(0, 9.0, 100), (1, 1.0, 200), (2, 2.0, 210), (3, 1.5, 220), (4, 3.0, 230)]]
    theirs = [{"turn": t, "ttft_s": s, "prompt_tokens": n} for t, s, n in
              [(0, 1.0, 100), (1, 1.2, 200), (2, 1.9, 210), (3, 1.0, 180), (4, 3.5, 230)]]
    # turn 0 is not late, turn 3 read another prompt: turns 1, 2 and 4 are compared
    assert paired_difference(ours, theirs, late_from=1) == {"turns": 3, "ttft_diff_median_s": -0.2, "kvside_first": 2}
    assert paired_difference(ours, theirs, late_from=9) == {"turns": 0}


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_bench_serve_servers_follow_each_other_equally_often(n):
    from collections import Counter

    from kvside.bench.serve import turn_order

    cycle = 2 * n if n % 2 else n
    rows = [turn_order(n, t) for t in range(cycle)]
    assert all(sorted(row) == list(range(n)) for row in rows)
    assert turn_order(n, cycle) == rows[0]
    # within the turns of one cycle: each server first equally often, each ordered pair once (or twice)
    assert Counter(row[0] for row in rows) == {i: cycle // n for i in range(n)}
    pairs = Counter((a, b) for row in rows for a, b in zip(row, row[1:]))
    assert set(pairs) == {(a, b) for a in range(n) for b in range(n) if a != b}
    assert set(pairs.values()) == {cycle // n}


def test_continue_llamacpp_provider_streams_completion(daemon_url):
    """Continue's llama.cpp provider: POST /completion streamed, reading `content` from each event;
    the chat markup in its client-rendered prompt is read as special tokens, as llama-server does."""
    body = load("continue_llamacpp_completion", "default")
    r = httpx.post(daemon_url + "/completion", json=body, timeout=120)
    assert r.status_code == 200, r.text
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    text = "".join(e.get("content") or "" for e in events)
    assert events[-1]["stop"] is True and text.strip() and "<|im_end|>" not in text
    assert events[-1]["tokens_evaluated"] < 40  # special tokens, not their spelled-out text
