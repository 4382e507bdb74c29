"""Ollama's API on kvside, driven by the real `ollama` client: what Zed's, Copilot Chat's, Cline's and
Continue's Ollama providers call. Requests go through the same session binding as /v1."""

import json

import httpx
import ollama
import pytest

from conftest import LiveDaemon
from kvside.engine import Engine

MODEL = "smollm2-135m:latest"
GREEDY = {"temperature": 0, "num_predict": 8}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    with Engine(n_ctx=512, max_sessions=2, n_threads=2, sessions_dir=str(tmp_path_factory.mktemp("ollama"))) as e:
        daemon = LiveDaemon(e)
        yield daemon
        daemon.stop()


@pytest.fixture
def client(live):
    return ollama.Client(host=live.url)


def test_version_tags_show_ps(client, live):
    assert httpx.get(live.url + "/api/version").json()["version"] >= "0.6.4"  # Copilot Chat's minimum
    models = client.list().models
    assert [m.model for m in models] == [MODEL] and models[0].details.format == "gguf"
    shown = client.show(MODEL)
    assert "completion" in shown.capabilities and "tools" not in shown.capabilities
    assert shown.modelinfo["llama.context_length"] == 512
    assert "im_start" in shown.template
    assert client.ps().models[0].context_length == 512


def test_chat_streamed_and_not(client):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a color."}]
    whole = client.chat(model=MODEL, messages=messages, stream=False, options=GREEDY)
    assert whole.done and whole.done_reason in ("stop", "length") and whole.message.content
    assert whole.eval_count > 0 and whole.prompt_eval_count > 0 and whole.total_duration > 0
    parts = list(client.chat(model=MODEL, messages=messages, stream=True, options=GREEDY))
    assert parts[-1].done and not any(p.done for p in parts[:-1])
    assert "".join(p.message.content for p in parts) == whole.message.content  # greedy: the same reply


def test_a_continued_conversation_reuses_the_cache(client):
    history = [{"role": "user", "content": "My name is Ines."}]
    first = client.chat(model=MODEL, messages=history, stream=False, options=GREEDY)
    history += [{"role": "assistant", "content": first.message.content}, {"role": "user", "content": "And yours?"}]
    second = client.chat(model=MODEL, messages=history, stream=False, options=GREEDY)
    assert second.prompt_eval_count < first.prompt_eval_count  # only the new turn was read


def test_format_json_and_schema(client):
    """`format`: "json" or a JSON schema, through the same grammar path as /v1's response_format."""
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "rank": {"type": "integer"}},
              "required": ["city", "rank"]}
    r = client.chat(model=MODEL, messages=[{"role": "user", "content": "Name a city and its rank."}], format=schema,
                    stream=False, options={**GREEDY, "num_predict": 80})
    value = json.loads(r.message.content)
    assert isinstance(value["city"], str) and isinstance(value["rank"], int)
    parts = list(client.generate(model=MODEL, prompt="Reply with a JSON object with key 'a'.", format="json",
                                 stream=True, options={**GREEDY, "num_predict": 200}))
    assert parts[-1].done_reason == "stop"
    assert isinstance(json.loads("".join(p.response for p in parts)), dict)


def test_generate_templated_and_raw(client):
    r = client.generate(model=MODEL, prompt="Say hello.", system="You are terse.", stream=False, options=GREEDY)
    assert r.done and r.response
    raw = list(client.generate(model=MODEL, prompt="The capital of France is", raw=True, stream=True, options=GREEDY))
    assert raw[-1].done and "".join(p.response for p in raw)
    assert client.generate(model=MODEL, prompt="").done_reason == "load"  # what clients send to warm up


@pytest.mark.parametrize("call, message", [
    (lambda c: c.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}], options={"num_ctx": 100000}),
     "num_ctx"),
    (lambda c: c.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                      tools=[{"type": "function", "function": {"name": "no spaces please", "parameters": {}}}]),
     "function name"),
    (lambda c: c.generate(model=MODEL, prompt="x", raw=True, format="json"), "format"),
    (lambda c: c.chat(model=MODEL, messages=[{"role": "user", "content": "hi", "images": ["aGk="]}]), "images"),
    (lambda c: c.chat(model="llama3:latest", messages=[{"role": "user", "content": "hi"}]), "not served"),
    (lambda c: c.generate(model=MODEL, prompt="def f(", suffix="return 1"), "fill-in-the-middle"),
    (lambda c: c.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}], options={"temperature": "hot"}),
     "temperature"),
])
def test_refusals_are_clear_ollama_errors(client, call, message):
    with pytest.raises(ollama.ResponseError) as err:
        out = call(client)
        list(out) if not isinstance(out, (ollama.ChatResponse, ollama.GenerateResponse)) else out
    assert err.value.status_code in (400, 404) and message in err.value.error


def test_each_front_samples_with_its_own_apis_repeat_penalty(live):
    """OpenAI's API and llama-server apply no repeat penalty unless asked; Ollama applies 1.1. Each
    front's default shows in what the reply was sampled with."""
    from kvside.engine.sampling import SamplingParams
    from kvside.server import ollama_api

    assert SamplingParams().repeat_penalty == 1.0
    assert ollama_api.options({}, 512)["repeat_penalty"] == 1.1
    assert ollama_api.options({"options": {"repeat_penalty": 1.0}}, 512)["repeat_penalty"] == 1.0
    body = {"prompt": "Once upon a time", "n_predict": 2}
    settings = httpx.post(live.url + "/completion", json=body, timeout=120).json()["generation_settings"]
    assert settings["repeat_penalty"] == 1.0
