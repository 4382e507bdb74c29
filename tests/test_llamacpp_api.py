"""llama-server's helper endpoints on kvside, checked against what clients do with them: llama.vscode
counts a request's tokens with /apply-template + /tokenize, Zed reads n_ctx and the template's
capabilities from /props and /v1/models."""

import json

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


STORY = ("Once upon a time, in a quiet village by the sea, there lived an old clockmaker who repaired every "
         "clock in town. Each morning he opened his shop, wound the great clock on the wall, and waited. ")


def test_completion_answers_in_llama_servers_shape_and_reuses_the_prompt(url):
    first = post(url, "/completion", {"prompt": STORY, "n_predict": 8, "temperature": 0})
    assert first.status_code == 200
    body = first.json()
    assert body["stop"] is True and body["stop_type"] in ("eos", "limit") and isinstance(body["content"], str)
    assert body["tokens_predicted"] == 8 and body["stop_type"] == "limit"
    assert body["tokens_evaluated"] == body["timings"]["prompt_n"] + body["timings"]["cache_n"]
    assert body["tokens_cached"] == body["tokens_evaluated"] + body["tokens_predicted"]
    assert set(body["timings"]) >= {"prompt_n", "prompt_ms", "predicted_n", "predicted_ms", "predicted_per_second"}
    # the next keystroke: the same text and a little more; its prefix is not read again
    again = post(url, "/completion", {"prompt": STORY + "One day", "n_predict": 4, "temperature": 0}).json()
    assert again["timings"]["cache_n"] >= body["tokens_evaluated"] - 1
    assert again["kvside"]["prefix_tokens"] == again["timings"]["cache_n"]
    # cache_prompt false: read whole
    cold = post(url, "/completion", {"prompt": STORY + "One day", "n_predict": 4, "temperature": 0,
                                     "cache_prompt": False}).json()
    assert cold["timings"]["cache_n"] == 0 and cold["content"] == again["content"]


def test_completion_takes_token_ids_and_mixed_prompts(url):
    ids = post(url, "/tokenize", {"content": STORY, "add_special": True}).json()["tokens"]
    by_text = post(url, "/completion", {"prompt": STORY, "n_predict": 6, "temperature": 0}).json()
    by_ids = post(url, "/completion", {"prompt": ids, "n_predict": 6, "temperature": 0}).json()
    assert by_ids["content"] == by_text["content"] and by_ids["tokens_evaluated"] == len(ids)
    half = len(STORY) // 2
    head = post(url, "/tokenize", {"content": STORY[:half], "add_special": True}).json()["tokens"]
    mixed = post(url, "/completion", {"prompt": head + [STORY[half:]], "n_predict": 6, "temperature": 0}).json()
    assert mixed["stop"] is True and mixed["tokens_evaluated"] >= len(head)


def test_completion_streams_content_then_one_final_event(url):
    events = []
    with httpx.stream("POST", url + "/completion", json={"prompt": STORY, "n_predict": 6, "temperature": 0,
                                                          "stream": True}, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert "[DONE]" not in events  # llama-server's own stream ends with the stop event
    import json as _json
    parsed = [_json.loads(e) for e in events]
    assert all(e["stop"] is False for e in parsed[:-1]) and parsed[-1]["stop"] is True
    assert parsed[-1]["content"] == "" and "timings" in parsed[-1]
    whole = post(url, "/completion", {"prompt": STORY, "n_predict": 6, "temperature": 0}).json()
    assert "".join(e["content"] for e in parsed[:-1]) == whole["content"]


def test_completion_warm_up_reads_the_prompt_and_answers_nothing(url):
    warm = post(url, "/completion", {"prompt": STORY + "The end?", "n_predict": 0}).json()
    assert warm["content"] == "" and warm["tokens_predicted"] == 0
    after = post(url, "/completion", {"prompt": STORY + "The end?", "n_predict": 3, "temperature": 0}).json()
    assert after["timings"]["cache_n"] == after["tokens_evaluated"] - 1


@pytest.mark.parametrize("body", [
    {"prompt": 5}, {"prompt": []}, {"prompt": ""}, {"prompt": ["a", "b"]}, {"prompt": [[1, 2], [3]]},
    {"prompt": [10 ** 9]}, {"prompt": "x", "n_predict": -5}, {"prompt": "x", "n_predict": "8"},
    {"prompt": "x", "cache_prompt": "yes"}, {"prompt": "x", "model": "gpt-9"}, {"prompt": "x", "temperature": "hot"},
])
def test_bad_completion_requests_are_clear_errors(url, body):
    r = post(url, "/completion", body)
    assert r.status_code in (400, 404) and r.json()["error"]["message"]


def test_ignore_eos_keeps_generating_and_is_type_checked(url):
    """llama-server's `ignore_eos` (benchmarks use it to time a fixed number of tokens)."""
    r = post(url, "/completion", {"prompt": "Say hi.", "n_predict": 24, "ignore_eos": True, "temperature": 0})
    assert r.status_code == 200 and r.json()["tokens_predicted"] == 24
    assert r.json()["timings"]["predicted_per_second"] > 0
    bad = post(url, "/completion", {"prompt": "Say hi.", "n_predict": 4, "ignore_eos": "yes"})
    assert bad.status_code == 400 and "ignore_eos" in bad.json()["error"]["message"]
    chat = post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 12,
                                               "ignore_eos": True, "temperature": 0})
    assert chat.json()["usage"]["completion_tokens"] == 12


def test_chat_completions_carry_llama_servers_timings(url):
    """llama-server adds `timings` to a chat reply and to the last chunk of a streamed one (its
    web UI and benchmarks read them): kvside's say the same of what it read and wrote."""
    messages = [{"role": "user", "content": "Name three colours."}]
    whole = post(url, "/v1/chat/completions", {"messages": messages, "max_tokens": 6, "temperature": 0}).json()
    t = whole["timings"]
    usage = whole["usage"]
    assert t["prompt_n"] + t["cache_n"] == usage["prompt_tokens"] and t["predicted_n"] == usage["completion_tokens"]
    assert t["prompt_ms"] > 0 and t["predicted_ms"] >= 0
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=120, json={
            "messages": messages, "max_tokens": 6, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    finished = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finished) == 1
    assert finished[0]["timings"]["predicted_n"] == chunks[-1]["usage"]["completion_tokens"] > 0
    assert all("timings" not in c for c in chunks if c is not finished[0])
