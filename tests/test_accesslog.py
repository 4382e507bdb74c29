"""`kvside serve --log-requests`: a line per request once it is answered, with what the cache did
for a reply; nothing logged, and nothing measured, when it is off."""

import logging

import httpx
import openai
import pytest

from kvside.server import accesslog


@pytest.fixture
def lines(caplog):
    with caplog.at_level(logging.INFO, logger="kvside.requests"):
        yield lambda: [r.getMessage() for r in caplog.records if r.name == "kvside.requests"]


def _fields(line: str) -> dict:
    return dict(part.split("=", 1) for part in line.split() if "=" in part)


def test_each_request_is_logged_once_answered_with_what_the_cache_did(daemon_url, lines):
    client = openai.OpenAI(base_url=daemon_url + "/v1", api_key="unused")
    history = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    first = client.chat.completions.create(model="default", messages=history, max_tokens=8, temperature=0)
    history += [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "Another one."}]
    chunks = list(client.chat.completions.create(model="default", messages=history, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    streamed_usage = chunks[-1].usage
    assert httpx.post(daemon_url + "/v1/chat/completions", json={"messages": "nope"}).status_code == 400
    assert httpx.get(daemon_url + "/health").status_code == 200

    logged = lines()
    assert len(logged) == 4, logged
    one, two, bad, health = logged
    assert one.startswith("POST /v1/chat/completions 200 ")
    f1, f2 = _fields(one), _fields(two)
    assert f1["prompt"] == str(first.usage.prompt_tokens) and f1["cached"] == "0"
    assert f1["out"] == str(first.usage.completion_tokens) and f1["finish"] in ("stop", "length")
    assert f1["model"] == "smollm2-135m" and f1["session"]
    # the stream's line comes once it has ended, with the turn that continued the first one's session
    assert two.startswith("POST /v1/chat/completions 200 ")
    assert f2["session"] == f1["session"] and int(f2["cached"]) == streamed_usage.prompt_tokens_details.cached_tokens > 0
    assert f2["reused_messages"] == "3"
    assert bad.startswith("POST /v1/chat/completions 400 ") and "session=" not in bad
    assert health.startswith("GET /health 200 ")


def test_nothing_is_logged_when_it_is_off(daemon_url, caplog):
    with caplog.at_level(logging.WARNING, logger="kvside.requests"):
        assert httpx.get(daemon_url + "/health").status_code == 200
    assert [r for r in caplog.records if r.name == "kvside.requests"] == []
    accesslog.note(model="x")  # outside a logged request: nothing to add to, no error


def test_a_client_that_goes_away_mid_stream_is_logged_so(daemon_url, lines):
    import time

    body = {"messages": [{"role": "user", "content": "Count from one to fifty in words."}], "max_tokens": 200,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", daemon_url + "/v1/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if '"content"' in line and '"content": ""' not in line:
                break  # the first words: the client leaves
    for _ in range(200):
        if lines():
            break
        time.sleep(0.05)
    [line] = lines()
    assert line.startswith("POST /v1/chat/completions 200 ") and "finish=client gone" in line, line
