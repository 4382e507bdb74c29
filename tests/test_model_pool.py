"""Several models in one daemon (`kvside serve --max-models N --memory-budget SIZE`): a request's
`model` picks any installed model, loaded on demand, unloaded least recently used first or when its
keep-alive runs out; /v1/models and Ollama's tags list what is installed, /api/ps what is loaded;
sessions stay with their model. Run as a user would: a `kvside serve` process on tiny GGUFs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tinygguf import write


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    def __init__(self, home: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "KVSIDE_HOME": str(home), "KVSIDE_NATIVE": "off"}
        self.proc = subprocess.Popen([sys.executable, "-m", "kvside.cli", "serve", "--port", str(self.port),
                                      "--n-ctx", "512", "--threads", "2", *args], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise AssertionError(f"kvside serve did not start: {self.proc.stderr.read()}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def loaded(self) -> set[str]:
        return {m["name"].removesuffix(":latest") for m in httpx.get(self.url + "/api/ps").json()["models"]}


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A kvside home whose models folder holds three tiny models; the daemon starts on tiny-llama."""
    home = tmp_path_factory.mktemp("pool-home")
    (home / "models").mkdir()
    for arch in ("llama", "qwen2", "gemma3"):
        write(arch, home / "models" / f"tiny-{arch}.gguf", seed=7)
    return home


def chat(url: str, model: str, text: str = "hello", **extra) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": text}],
                                                          "max_tokens": 3, "temperature": 0, **extra}, timeout=120)


def test_any_installed_model_answers_and_the_least_recently_used_unloads(home):
    d = Served(home, "--model", "tiny-llama", "--max-models", "2")
    try:
        listed = {m["id"] for m in httpx.get(d.url + "/v1/models").json()["data"]}
        assert {"tiny-llama", "tiny-qwen2", "tiny-gemma3"} <= listed
        tags = {m["name"] for m in httpx.get(d.url + "/api/tags").json()["models"]}
        assert {"tiny-llama:latest", "tiny-qwen2:latest", "tiny-gemma3:latest"} <= tags
        assert d.loaded() == {"tiny-llama"}
        shown = httpx.post(d.url + "/api/show", json={"model": "tiny-gemma3:latest"}).json()  # without loading it
        assert shown["details"]["family"] == "gemma3" and "<start_of_turn>" in shown["template"]
        assert d.loaded() == {"tiny-llama"}
        r = chat(d.url, "tiny-qwen2")
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "tiny-qwen2"
        assert d.loaded() == {"tiny-llama", "tiny-qwen2"}
        r = chat(d.url, "tiny-gemma3:latest")  # Ollama's spelling works on the OpenAI front too
        assert r.status_code == 200, r.text
        assert d.loaded() == {"tiny-llama", "tiny-gemma3"}  # qwen2 was the least recently used
        assert chat(d.url, "tiny-llama").json()["model"] == "tiny-llama"  # the first model never unloads
        missing = chat(d.url, "nothing-here")
        assert missing.status_code == 404 and "not installed" in missing.json()["error"]["message"]
        path = chat(d.url, str(home / "models" / "tiny-qwen2.gguf"))  # a request never opens a path
        assert path.status_code == 404
    finally:
        d.stop()


def test_keep_alive_zero_unloads_after_the_request(home):
    d = Served(home, "--model", "tiny-llama", "--max-models", "3")
    try:
        r = httpx.post(d.url + "/api/chat", json={"model": "tiny-qwen2", "stream": False, "keep_alive": 0,
                                                  "messages": [{"role": "user", "content": "hello"}],
                                                  "options": {"num_predict": 2}}, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "tiny-qwen2"
        deadline = time.time() + 15
        while time.time() < deadline and "tiny-qwen2" in d.loaded():
            time.sleep(0.3)
        assert d.loaded() == {"tiny-llama"}
        kept = httpx.post(d.url + "/api/generate", json={"model": "tiny-gemma3", "prompt": "hello", "stream": False,
                                                         "keep_alive": "10m", "options": {"num_predict": 2}}, timeout=120)
        assert kept.status_code == 200, kept.text
        time.sleep(2.5)
        assert "tiny-gemma3" in d.loaded()
        bad = httpx.post(d.url + "/api/chat", json={"model": "tiny-qwen2", "keep_alive": "soon",
                                                    "messages": [{"role": "user", "content": "hi"}]}, timeout=30)
        assert bad.status_code == 400 and "keep_alive" in bad.json()["error"]
    finally:
        d.stop()


def test_ollama_loads_and_unloads_a_model_with_an_empty_request(home):
    """Open WebUI's and Ollama's own way: a request with nothing to answer loads the model, the same
    with keep_alive 0 unloads it at once; the daemon's first model says it stays."""
    d = Served(home, "--model", "tiny-llama", "--max-models", "3")
    try:
        load = httpx.post(d.url + "/api/generate", json={"model": "tiny-qwen2"}, timeout=120)
        assert load.json()["done_reason"] == "load" and d.loaded() == {"tiny-llama", "tiny-qwen2"}
        chat_load = httpx.post(d.url + "/api/chat", json={"model": "tiny-gemma3", "messages": []}, timeout=120)
        assert chat_load.json()["done_reason"] == "load" and chat_load.json()["message"]["content"] == ""
        assert d.loaded() == {"tiny-llama", "tiny-qwen2", "tiny-gemma3"}
        unload = httpx.post(d.url + "/api/generate", json={"model": "tiny-qwen2", "keep_alive": 0}, timeout=60)
        assert unload.json()["done_reason"] == "unload" and d.loaded() == {"tiny-llama", "tiny-gemma3"}
        chat_unload = httpx.post(d.url + "/api/chat", json={"model": "tiny-gemma3:latest", "messages": [],
                                                            "keep_alive": 0}, timeout=60)
        assert chat_unload.json()["done_reason"] == "unload" and d.loaded() == {"tiny-llama"}
        first = httpx.post(d.url + "/api/generate", json={"model": "tiny-llama", "keep_alive": 0}, timeout=60)
        assert first.status_code == 400 and "serves" in first.json()["error"]
        assert d.loaded() == {"tiny-llama"}
    finally:
        d.stop()


def test_a_memory_budget_refuses_what_cannot_fit_and_makes_room_for_what_can(home):
    # footprints at --n-ctx 512, 4 sessions: tiny-llama and tiny-qwen2 about 1.1 MB each with their KV
    # cache, tiny-gemma3 (6 layers) about 3 MB
    small = Served(home, "--model", "tiny-llama", "--max-models", "3", "--memory-budget", "2M")
    try:
        r = chat(small.url, "tiny-gemma3")
        assert r.status_code == 503 and "does not fit in the memory budget" in r.json()["error"]["message"], r.text
        assert small.loaded() == {"tiny-llama"}
    finally:
        small.stop()
    roomy = Served(home, "--model", "tiny-llama", "--max-models", "3", "--memory-budget", "4.5M")
    try:
        assert chat(roomy.url, "tiny-qwen2").status_code == 200
        assert roomy.loaded() == {"tiny-llama", "tiny-qwen2"}
        assert chat(roomy.url, "tiny-gemma3").status_code == 200
        assert roomy.loaded() == {"tiny-llama", "tiny-gemma3"}  # qwen2 made room, though --max-models allows 3
    finally:
        roomy.stop()


def test_sessions_stay_with_their_model(home):
    d = Served(home, "--model", "tiny-llama", "--max-models", "2")

    def post(model: str, messages: list[dict]) -> httpx.Response:
        return httpx.post(d.url + "/v1/chat/completions", headers={"X-Kvside-Session": "notes"},
                          json={"model": model, "messages": messages, "max_tokens": 2, "temperature": 0}, timeout=120)

    try:
        first = post("tiny-qwen2", [{"role": "user", "content": "hello"}])
        assert first.status_code == 200, first.text
        reply = first.json()["choices"][0]["message"]["content"] or ""
        names = {s["name"] for s in httpx.get(d.url + "/kvside/sessions").json()["sessions"]}
        assert "notes" not in names  # the first model's sessions do not include the other model's
        assert chat(d.url, "tiny-gemma3").status_code == 200  # qwen2 unloads, saving its sessions
        assert list((home / "sessions" / "models" / "tiny-qwen2").glob("notes*")), list((home / "sessions").rglob("*"))
        own = post("tiny-llama", [{"role": "user", "content": "hi"}])  # the same name: a session of its own
        assert own.status_code == 200, own.text
        back = post("tiny-qwen2", [{"role": "user", "content": "hello"}, {"role": "assistant", "content": reply},
                                   {"role": "user", "content": "again"}])
        assert back.status_code == 200, back.text
        assert back.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # restored into qwen2, from its folder
    finally:
        d.stop()


def test_session_endpoints_take_the_model_whose_sessions_they_act_on(home):
    d = Served(home, "--model", "tiny-llama", "--max-models", "2")
    sessions = d.url + "/kvside/sessions"
    try:
        r = httpx.post(d.url + "/v1/chat/completions", headers={"X-Kvside-Session": "work"}, timeout=120,
                       json={"model": "tiny-qwen2", "max_tokens": 2, "temperature": 0,
                             "messages": [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
                                          {"role": "user", "content": "three"}]})
        assert r.status_code == 200, r.text
        assert "work" not in {s["name"] for s in httpx.get(sessions).json()["sessions"]}
        assert "work" in {s["name"] for s in httpx.get(sessions, params={"model": "tiny-qwen2"}).json()["sessions"]}
        shown = httpx.get(f"{sessions}/work", params={"model": "tiny-qwen2"})
        assert shown.status_code == 200 and shown.json()["session"]["name"] == "work"
        assert httpx.get(f"{sessions}/work").status_code == 404  # not a session of the first model
        masked = httpx.post(f"{sessions}/work/mask", params={"model": "tiny-qwen2"}, json={"messages": [0]})
        assert masked.status_code == 200 and masked.json()["masked"] > 0, masked.text
        saved = httpx.get(f"{sessions}/work/file", params={"model": "tiny-qwen2"})
        assert saved.status_code == 200 and len(saved.content) > 0
        put = httpx.put(f"{sessions}/copy/file", params={"model": "tiny-qwen2"}, content=saved.content,
                        headers={"Content-Type": "application/octet-stream"})
        assert put.status_code == 200, put.text
        # a session file of one model is refused by another
        wrong = httpx.put(f"{sessions}/copy/file", content=saved.content, headers={"Content-Type": "application/octet-stream"})
        assert wrong.status_code == 400 and "model" in wrong.json()["error"]["message"], wrong.text
        gone = httpx.get(sessions, params={"model": "no-such-model"})
        assert gone.status_code == 404 and "no-such-model" in gone.json()["error"]["message"]
        assert httpx.delete(f"{sessions}/work", params={"model": "tiny-qwen2"}).status_code == 200
    finally:
        d.stop()


def test_llama_server_endpoints_take_the_model_of_the_body(home):
    d = Served(home, "--model", "tiny-llama", "--max-models", "2")
    try:
        r = httpx.post(d.url + "/completion", json={"model": "tiny-qwen2", "prompt": "hello", "n_predict": 2}, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "tiny-qwen2" and "tiny-qwen2" in d.loaded()
        fim = httpx.post(d.url + "/infill", json={"model": "tiny-qwen2", "input_prefix": "a", "input_suffix": "b",
                                                   "n_predict": 2}, timeout=120)
        assert fim.status_code in (200, 400), fim.text  # 400: a tiny model without FIM tokens says so
        for path, body in (("/tokenize", {"content": "hello"}), ("/apply-template",
                                                                   {"messages": [{"role": "user", "content": "hi"}]})):
            assert httpx.post(d.url + path, json={**body, "model": "tiny-qwen2"}).status_code == 200
        tokens = httpx.post(d.url + "/tokenize", json={"content": "hello", "model": "tiny-gemma3"}).json()["tokens"]
        back = httpx.post(d.url + "/detokenize", json={"tokens": tokens, "model": "tiny-gemma3"})
        assert back.status_code == 200 and "hello" in back.json()["content"]
        for path in ("/completion", "/tokenize"):
            gone = httpx.post(d.url + path, json={"model": "no-such-model", "prompt": "x", "content": "x"})
            assert gone.status_code == 404 and "no-such-model" in gone.json()["error"]["message"], gone.text
        assert httpx.post(d.url + "/tokenize", json={"model": 7, "content": "x"}).status_code == 400
    finally:
        d.stop()


def test_metrics_report_every_loaded_model(home):
    from prometheus_client.parser import text_string_to_metric_families

    d = Served(home, "--model", "tiny-llama", "--max-models", "2")

    def series(name: str) -> dict:
        text = httpx.get(d.url + "/metrics").text
        return {tuple(sorted(s.labels.items())): s.value for f in text_string_to_metric_families(text)
                for s in f.samples if s.name == name}

    try:
        assert httpx.post(d.url + "/v1/chat/completions", headers={"X-Kvside-Session": "m"}, timeout=120,
                          json={"model": "tiny-qwen2", "max_tokens": 2, "temperature": 0,
                                "messages": [{"role": "user", "content": "hello"}]}).status_code == 200
        sessions = series("kvside_sessions")
        assert sessions[(("model", "tiny-qwen2"), ("where", "resident"))] == 1
        assert (("model", "tiny-llama"), ("where", "resident")) in sessions
        assert series("kvside_llama_decode_seconds")[(("model", "tiny-qwen2"),)] > 0
        assert chat(d.url, "tiny-gemma3").status_code == 200  # qwen2 unloads (two at most): its series go
        models = {dict(k)["model"] for k in series("kvside_sessions")}
        assert models == {"tiny-llama", "tiny-gemma3"}
    finally:
        d.stop()
