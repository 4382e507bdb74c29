"""Embeddings on every front: /v1/embeddings through the `openai` client, /api/embed and the older
/api/embeddings through the `ollama` client. With --embedding-model (a tiny BERT written with the
`gguf` package: random weights, a real WordPiece vocabulary) the vectors come from that model in its
own context; without one, from the chat model's mean-pooled hidden states. Chat sessions are not
disturbed either way."""

import base64

import httpx
import numpy as np
import ollama
import openai
import pytest

from conftest import GREEDY, LiveDaemon
from kvside.engine import Engine
from kvside.engine.model import Model
from tiny_models import write_bert

TEXTS = ["the cat sat on the mat", "the dog sat on the mat", "python function return value"]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return write_bert(tmp_path_factory.mktemp("bert") / "tiny-bert.gguf")


@pytest.fixture(scope="module")
def url(bert, tmp_path_factory):
    with Engine(n_ctx=512, max_sessions=2, n_threads=2, embedding_model=str(bert),
                sessions_dir=str(tmp_path_factory.mktemp("sessions"))) as e:
        live = LiveDaemon(e)
        yield live.url
        live.stop()


def test_openai_client_gets_unit_vectors_from_the_embedding_model(url):
    client = openai.OpenAI(base_url=url + "/v1", api_key="none")
    r = client.embeddings.create(model="tiny-bert", input=TEXTS + [TEXTS[0]])  # base64 on the wire
    vectors = [np.array(d.embedding) for d in r.data]
    assert [d.index for d in r.data] == [0, 1, 2, 3]
    assert all(len(v) == 32 for v in vectors)
    assert all(abs(np.linalg.norm(v) - 1) < 1e-5 for v in vectors)
    assert np.allclose(vectors[0], vectors[3])
    assert not np.allclose(vectors[0], vectors[1]) and not np.allclose(vectors[0], vectors[2])
    assert r.usage.prompt_tokens == r.usage.total_tokens > 4 * 5
    assert r.model == "tiny-bert"
    floats = httpx.post(url + "/v1/embeddings", json={"input": TEXTS[0], "encoding_format": "float"}).json()
    assert np.allclose(floats["data"][0]["embedding"], vectors[0], atol=1e-6)


def test_token_ids_embed_as_their_text(url, bert):
    ids = Model(bert).tokenize(TEXTS[1], add_special=True)
    by_ids = httpx.post(url + "/v1/embeddings", json={"input": ids, "encoding_format": "float"}).json()
    by_text = httpx.post(url + "/v1/embeddings", json={"input": [TEXTS[1]], "encoding_format": "float"}).json()
    assert np.allclose(by_ids["data"][0]["embedding"], by_text["data"][0]["embedding"], atol=1e-6)
    raw = httpx.post(url + "/v1/embeddings", json={"input": [ids, ids], "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][1]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, by_text["data"][0]["embedding"], atol=1e-6)


def test_ollama_client_embed_and_the_older_embeddings(url):
    client = ollama.Client(host=url)
    r = client.embed(model="tiny-bert", input=TEXTS)
    assert len(r.embeddings) == 3 and all(len(v) == 32 for v in r.embeddings)
    assert all(abs(np.linalg.norm(v) - 1) < 1e-5 for v in r.embeddings)
    assert r.prompt_eval_count > 0
    old = client.embeddings(model="tiny-bert:latest", prompt=TEXTS[0]).embedding
    assert np.allclose(np.array(old) / np.linalg.norm(old), r.embeddings[0], atol=1e-5)
    names = [m.model for m in client.list().models]
    assert "tiny-bert:latest" in names


def test_overlong_inputs_are_refused_or_truncated_as_asked(url):
    long = " ".join(["cat"] * 400)  # the tiny model's context is 128 tokens
    r = httpx.post(url + "/v1/embeddings", json={"input": long})
    assert r.status_code == 400 and "128" in r.json()["error"]["message"]
    client = ollama.Client(host=url)
    assert len(client.embed(model="tiny-bert", input=long).embeddings[0]) == 32  # truncate defaults to true
    with pytest.raises(ollama.ResponseError) as err:
        client.embed(model="tiny-bert", input=long, truncate=False)
    assert err.value.status_code == 400


@pytest.mark.parametrize("body, status", [
    ({"input": ""}, 400), ({"input": []}, 400), ({"input": [1, "a"]}, 400), ({"input": [[]]}, 400),
    ({"input": 5}, 400), ({"input": "x", "encoding_format": "hex"}, 400), ({"input": "x", "dimensions": 7}, 400),
    ({"input": "x", "model": "text-embedding-3-large"}, 404), ({"input": [10 ** 9]}, 400),
])
def test_bad_embedding_requests_are_clear_errors(url, body, status):
    r = httpx.post(url + "/v1/embeddings", json=body)
    assert r.status_code == status and r.json()["error"]["message"]


def test_chat_is_untouched_by_embeddings(url):
    body = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8, **GREEDY}
    before = httpx.post(url + "/v1/chat/completions", json=body, timeout=120).json()["choices"][0]["message"]
    httpx.post(url + "/v1/embeddings", json={"input": TEXTS})
    after = httpx.post(url + "/v1/chat/completions", json=body, timeout=120).json()["choices"][0]["message"]
    assert before == after


def test_without_an_embedding_model_the_chat_model_embeds_and_says_so(daemon_url):
    r = httpx.post(daemon_url + "/v1/embeddings", json={"input": TEXTS, "encoding_format": "float"}, timeout=120)
    assert r.status_code == 200
    vectors = [np.array(d["embedding"]) for d in r.json()["data"]]
    assert all(len(v) == 576 for v in vectors)
    near, far = vectors[0] @ vectors[1], vectors[0] @ vectors[2]
    assert near > far  # two sentences about animals on a mat are closer than one about code
    props = httpx.get(daemon_url + "/props").json()["embeddings"]
    assert props["trained_for_embeddings"] is False and "note" in props


def test_a_bad_embedding_model_fails_at_start(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(Exception, match="broken|GGUF|load"):
        Engine(n_ctx=256, max_sessions=1, n_threads=2, embedding_model=str(bad)).start()
