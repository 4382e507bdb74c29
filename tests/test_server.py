"""The daemon on loopback, driven by the official openai client and by raw HTTP."""

import json
import threading
import time

import httpx
import openai
import pytest

from conftest import LiveDaemon
from kvside.engine import Engine

KEY = "test-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    engine = Engine(n_ctx=512, max_sessions=4, n_threads=2, sessions_dir=str(tmp_path_factory.mktemp("srv"))).start()
    live = LiveDaemon(engine, api_key=KEY, max_body=64 * 1024, keepalive_s=0.5)
    yield live.url, live.daemon
    live.stop()
    engine.close()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=120)


G = dict(temperature=0, max_tokens=16)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["smollm2-135m"]
    assert httpx.get(server[0] + "/health").json()["status"] == "ok"


def test_chat_non_streaming_with_usage(client):
    r = client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "Say hi."}], **G)
    assert r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
    assert r.usage.prompt_tokens_details.cached_tokens == 0


def test_chat_streaming_with_usage_chunk(client):
    chunks = list(client.chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "Count to three."}], stream=True,
        stream_options={"include_usage": True}, **G))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)


def test_full_arrays_reuse_the_cache_and_dropped_front_is_an_edit(client):
    system = {"role": "system", "content": "You are a terse assistant for reuse tests."}
    history = [system]
    cached = []
    for q in ["Name a color.", "Name a fruit.", "Name an animal."]:
        history.append({"role": "user", "content": q})
        r = client.chat.completions.create(model="smollm2-135m", messages=history, max_completion_tokens=12, temperature=0)
        cached.append(r.usage.prompt_tokens_details.cached_tokens)
        history.append({"role": "assistant", "content": r.choices[0].message.content})
    assert cached[0] == 0 and cached[1] > 0 and cached[2] > cached[1]
    # the editor drops the oldest turn from the front, keeping the system prompt
    trimmed = [system] + history[3:] + [{"role": "user", "content": "Name a tree."}]
    r = client.chat.completions.create(model="smollm2-135m", messages=trimmed, max_tokens=12, temperature=0)
    extra = r.model_extra["kvside"]
    assert extra.get("dropped_messages") and extra["dropped_tokens"] > 0
    assert r.usage.prompt_tokens_details.cached_tokens > 0


def test_explicit_session_by_header(server, client):
    h = {"X-Kvside-Session": "editor-1"}
    r1 = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "I am Kim."}],
                                        extra_headers=h, **G)
    r2 = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Who am I?"}],
                                        extra_headers=h, **G)
    assert r2.usage.prompt_tokens_details.cached_tokens > r1.usage.prompt_tokens
    listed = httpx.get(server[0] + "/kvside/sessions", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert "editor-1" in [s["name"] for s in listed["sessions"]]


def test_completions_and_fim_refusal(client):
    r = client.completions.create(model="smollm2-135m", prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.choices[0].text and r.usage.completion_tokens > 0
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="smollm2-135m", prompt="def f(", suffix="return x", max_tokens=8)
    assert "fill-in-the-middle" in str(err.value)


def test_infill_without_fim_tokens_is_a_clear_error(server):
    r = httpx.post(server[0] + "/infill", headers={"Authorization": f"Bearer {KEY}"},
                   json={"input_prefix": "def add(a, b):\n    ", "input_suffix": "\n", "n_predict": 8})
    assert r.status_code == 400 and "fill-in-the-middle" in r.json()["error"]["message"]


def test_queue_full_answers_429_with_retry_after(server):
    base, daemon = server
    saved = daemon.max_active
    daemon.max_active = 0
    try:
        r = httpx.post(base + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                       json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    finally:
        daemon.max_active = saved
    assert r.status_code == 429 and r.headers.get("retry-after") == "1"
    assert r.json()["error"]["type"] == "rate_limit_error"


def test_openai_errors(client, server):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="default", messages=[], max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="default", messages=[{"role": "user", "content": "hi"}], temperature="hot")
    bad = openai.OpenAI(base_url=server[0] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


@pytest.mark.parametrize("body, status", [
    (b"{not json", 400),
    (b"\xff\xfe\x00garbage", 400),
    (b"[1, 2, 3]", 400),
    (json.dumps({"messages": "hello"}).encode(), 400),
    (json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(), 400),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}).encode(), 400),
    (json.dumps({"messages": [{"role": "user", "content": "x" * 70000}]}).encode(), 413),
])
def test_malformed_requests_get_openai_errors(server, body, status):
    r = httpx.post(server[0] + "/v1/chat/completions", content=body,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == status
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]


def test_unknown_route_and_method(server):
    r = httpx.get(server[0] + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(server[0] + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 405


def test_disconnect_cancels_generation(server):
    base, daemon = server
    with httpx.stream("POST", base + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"messages": [{"role": "user", "content": "Write a very long essay."}], "stream": True,
                            "max_tokens": 400, "temperature": 0}, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 4:
                break
    for _ in range(100):
        if daemon.active == 0:
            break
        time.sleep(0.05)
    assert daemon.active == 0


def test_edit_endpoints(server, client):
    base = server[0]
    auth = {"Authorization": f"Bearer {KEY}"}
    h = {"X-Kvside-Session": "edits"}
    for q in ["Tell me about rain.", "And snow?"]:
        client.chat.completions.create(model="default", messages=[{"role": "user", "content": q}], extra_headers=h, **G)
    shown = httpx.get(base + "/kvside/sessions/edits", headers=auth).json()
    assert shown["cache_map"] and shown["messages"]
    r = httpx.post(base + "/kvside/sessions/edits/roll", headers=auth, json={"drop": 5, "strategy": "shift"})
    assert r.status_code == 200 and r.json()["dropped"] == 5
    r = httpx.post(base + "/kvside/sessions/edits/fork", headers=auth, json={"name": "edits-copy"})
    assert r.json()["session"] == "edits-copy"
    r = httpx.post(base + "/kvside/sessions/edits/roll", headers=auth, json={"drop": "five"})
    assert r.status_code == 400
    r = httpx.post(base + "/kvside/sessions/nobody/roll", headers=auth, json={"drop": 1})
    assert r.status_code == 404
    assert httpx.delete(base + "/kvside/sessions/edits-copy", headers=auth).status_code == 200


def test_concurrent_streaming_clients(server):
    base = server[0]
    errors = []

    def one(i):
        try:
            c = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=120)
            text = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
                model="default", messages=[{"role": "user", "content": f"Say the number {i}."}],
                stream=True, max_tokens=8, temperature=0) if ch.choices)
            assert text
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not errors


def test_cli_uses_the_running_daemon(server, client, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    base = server[0]
    client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Remember: blue."}],
                                   extra_headers={"X-Kvside-Session": "cli-live"}, **G)
    kvside = str(Path(sys.executable).with_name("kvside"))
    env = dict(os.environ, KVSIDE_URL=base, KVSIDE_API_KEY=KEY)

    def cli(*args):
        return subprocess.run([kvside, *args], capture_output=True, text=True, timeout=120, env=env)

    listed = cli("sessions", "--json")
    assert listed.returncode == 0, listed.stderr
    assert "cli-live" in [r["name"] for r in json.loads(listed.stdout)]
    target = tmp_path / "live.kvs"
    out = cli("save", "cli-live", str(target))
    assert out.returncode == 0 and target.is_file(), out.stderr
    out = cli("restore", str(target), "--as", "cli-live-2")
    assert out.returncode == 0, out.stderr
    assert "cli-live-2" in [s["name"] for s in httpx.get(base + "/kvside/sessions",
                                                          headers={"Authorization": f"Bearer {KEY}"}).json()["sessions"]]
    bad = subprocess.run([kvside, "sessions", "--connect", "http://127.0.0.1:9"], capture_output=True, text=True,
                         timeout=60, env=dict(os.environ))
    assert bad.returncode == 1 and "no kvside daemon" in bad.stderr
