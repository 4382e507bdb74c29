"""llama-server's helper endpoints on kvside, checked against what clients do with them: llama.vscode
counts a request's tokens with /apply-template + /tokenize, Zed reads n_ctx and the template's
capabilities from /props and /v1/models."""

import httpx
import pytest



@pytest.fixture(scope="module")
def url(daemon_url):
    return daemon_url


def post(url, path, body):
    return httpx.post(url + path, json=body, timeout=120)


def test_props_and_models_give_the_window_and_the_template(url):
    props = httpx.get(url + "/props").json()
    assert props["default_generation_settings"]["n_ctx"] == 512
    assert props["total_slots"] == 2
    assert "im_start" in props["chat_template"]
    assert props["chat_template_caps"]["supports_tool_calls"] is False  # SmolLM2's template knows no tools
    assert props["chat_template_caps"]["supports_system_role"] is True
    assert "/" not in props["model_path"]
    meta = httpx.get(url + "/v1/models").json()["data"][0]["meta"]
    assert meta["n_ctx"] == 512 and meta["n_vocab"] == 49152 and meta["n_ctx_train"] >= 512
    assert httpx.get(url + "/models").json() == httpx.get(url + "/v1/models").json()


def test_tokenize_and_detokenize_round_trip(url):
    text = "Hello, KV cache! naïve café 日本"
    tokens = post(url, "/tokenize", {"content": text})
    assert tokens.status_code == 200
    ids = tokens.json()["tokens"]
    assert ids and all(isinstance(t, int) for t in ids)
    assert post(url, "/detokenize", {"tokens": ids}).json()["content"] == text
    pieces = post(url, "/tokenize", {"content": text, "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == ids
    joined = b"".join(p["piece"].encode() if isinstance(p["piece"], str) else bytes(p["piece"]) for p in pieces)
    assert joined.decode() == text
    special = post(url, "/tokenize", {"content": "<|im_start|>user"}).json()["tokens"]
    plain = post(url, "/tokenize", {"content": "<|im_start|>user", "parse_special": False}).json()["tokens"]
    assert len(special) < len(plain)


def test_apply_template_plus_tokenize_counts_what_a_chat_request_reads(url):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a bird."}]
    prompt = post(url, "/apply-template", {"messages": messages}).json()["prompt"]
    assert prompt.rstrip().endswith("assistant")
    n = len(post(url, "/tokenize", {"content": prompt, "add_special": True}).json()["tokens"])
    r = post(url, "/v1/chat/completions", {"messages": messages, "max_tokens": 2, "temperature": 0,
                                           "session": "count-check"}).json()
    assert r["usage"]["prompt_tokens"] == n


@pytest.mark.parametrize("path, body", [
    ("/tokenize", {"content": 5}), ("/tokenize", {"content": "x", "with_pieces": "yes"}), ("/tokenize", [1]),
    ("/detokenize", {"tokens": [-1]}), ("/detokenize", {"tokens": [10 ** 9]}), ("/detokenize", {"tokens": "abc"}),
    ("/apply-template", {"messages": []}), ("/apply-template", {"messages": [{"role": "wizard", "content": "x"}]}),
])
def test_bad_helper_requests_are_400s(url, path, body):
    r = post(url, path, body)
    assert r.status_code == 400 and r.json()["error"]["message"]
