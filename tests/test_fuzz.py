"""Property-based fuzzing (hypothesis) of what reaches kvside from outside: every HTTP endpoint's
request parsing, and the session-file reader. The properties: never a 5xx or a traceback, never a
half-registered session, and a daemon that still answers afterwards."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from kvside import sessionfile
from kvside.engine import Engine
from kvside.engine.commands import EDITS
from kvside.errors import KvsideError
from kvside.server.app import Daemon
from kvside.sessionfile import SessionFileError

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

scalars = st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | \
    st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) |
                           st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)

FIELDS = ["messages", "prompt", "model", "content", "tokens", "with_pieces", "add_special", "parse_special", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "min_p", "seed", "stop", "stream", "stream_options", "n", "session", "documents", "suffix",
          "repeat_penalty", "input_prefix", "input_suffix", "n_predict",
          # the edits' arguments
          "drop", "keep", "strategy", "boundary", "span", "close_gap", "up_to", "summary", "mode", "kind",
          "keep_last", "text", "name", "as", "document", "recompute", "path",
          # Ollama's
          "options", "system", "raw", "format", "tools", "images", "think", "keep_alive",
          # the Responses API's and Anthropic's
          "input", "instructions", "previous_response_id", "max_output_tokens", "text", "tool_choice", "store",
          "reasoning", "stop_sequences", "output_config", "parallel_tool_calls", "metadata"]
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "x", 3]),
                                 "content": st.text(max_size=30) | json_values})
field_values = {f: json_values for f in FIELDS} | {"messages": st.lists(message, max_size=3) | json_values}
bodies = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6).flatmap(
    lambda d: st.fixed_dictionaries({k: field_values[k] for k in d})) | json_values


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    # a 64-token window bounds any generation a valid random body starts
    engine = Engine(n_ctx=64, max_sessions=2, n_threads=2, sessions_dir=str(tmp_path_factory.mktemp("fuzz"))).start()
    daemon = Daemon(engine, keepalive_s=0.2)
    with TestClient(daemon.app, base_url="http://127.0.0.1", raise_server_exceptions=False) as c:
        assert c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                                    "session": "fz"}).status_code == 200
        yield c
    engine.close()


def assert_clean(r):
    assert r.status_code < 500 or r.status_code == 503, (r.status_code, r.text[:300])
    if r.status_code >= 400:
        err = r.json()["error"]
        message = err if isinstance(err, str) else err["message"]  # Ollama's shape, or OpenAI's
        assert isinstance(message, str) and message and "Traceback" not in message


ENDPOINTS = ["/v1/chat/completions", "/v1/completions", "/infill", "/kvside/restore", "/tokenize", "/detokenize",
             "/apply-template", "/api/chat", "/api/generate", "/api/show", "/v1/responses", "/v1/responses/input_tokens",
             "/v1/messages", "/v1/messages/count_tokens"] + \
    [f"/kvside/sessions/fz/{edit}" for edit in EDITS if edit not in ("compact",)]


@pytest.mark.parametrize("path", ENDPOINTS)
@FUZZ
@given(body=bodies)
def test_random_json_never_gets_a_5xx(client, path, body):
    if isinstance(body, dict) and path.endswith(("/chat/completions", "/completions", "/infill")):
        body.setdefault("max_tokens", 4)
    if isinstance(body, dict) and path.startswith("/api/"):
        body.setdefault("options", {"num_predict": 4})
    if isinstance(body, dict) and path.startswith("/v1/responses"):  # a valid input, so the other fields are read
        body.setdefault("max_output_tokens", 4)
        body.setdefault("input", "hi")
    if isinstance(body, dict) and path.startswith("/v1/messages"):
        body.setdefault("max_tokens", 4)
        body.setdefault("messages", [{"role": "user", "content": "hi"}])
    assert_clean(client.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"}))


@FUZZ
@given(raw=st.binary(max_size=200))
def test_random_bytes_never_get_a_5xx(client, raw):
    for path in ("/v1/chat/completions", "/kvside/sessions/fz/roll", "/kvside/restore"):
        assert_clean(client.post(path, content=raw, headers={"Content-Type": "application/json"}))


@FUZZ
@given(up_to=json_values, summary=st.text(max_size=10), mode=json_values)
def test_random_compaction_arguments_never_get_a_5xx(client, up_to, summary, mode):
    body = {"up_to": up_to, "summary": summary or "s", "mode": mode}
    assert_clean(client.post("/kvside/sessions/fz/compact", json=body))


@FUZZ
@given(name=st.text(max_size=80), edit=st.text(max_size=12))
def test_random_names_in_paths_never_get_a_5xx(client, name, edit):
    from urllib.parse import quote

    assert_clean(client.get(f"/kvside/sessions/{quote(name, safe='')}"))
    assert_clean(client.post(f"/kvside/sessions/{quote(name, safe='')}/{quote(edit, safe='')}", json={}))


def test_the_daemon_is_healthy_after_the_fuzzing(client):
    assert client.get("/health").json()["status"] == "ok"
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hello."}], "max_tokens": 3})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None


# -- the session-file reader -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("files")
    with Engine(n_ctx=128, max_sessions=2, n_threads=2, sessions_dir=str(folder / "s")) as engine:
        name = engine.new_session("orig")
        engine.chat(name, "A few words.", max_tokens=3, temperature=0).wait()
        path = folder / "orig.kvs"
        engine.save(name, str(path))
        engine.delete_session(name)
        yield engine, path.read_bytes(), folder


def _restore_refused(engine, data: bytes, folder, tag: str):
    path = folder / f"fz-{tag}.kvs"
    path.write_bytes(data)
    before = engine.sessions()
    with pytest.raises(KvsideError) as err:
        engine.restore(str(path), "fuzzed")
    assert err.value.status < 500 or isinstance(err.value, SessionFileError), err.value.message
    assert engine.sessions() == before


def _boundaries(data: bytes) -> list[int]:
    head_len = int.from_bytes(data[8:12], "little") if len(data) > 12 else 0
    state = 12 + head_len
    marks = [0, 1, 7, 8, 11, 12, 13, state - 1, state, state + 1, len(data) - 33, len(data) - 32, len(data) - 1]
    return sorted({m for m in marks if 0 <= m < len(data)})


def test_truncation_at_every_boundary_is_refused(saved):
    engine, data, folder = saved
    for cut in _boundaries(data):
        with pytest.raises(SessionFileError):
            path = folder / "cut.kvs"
            path.write_bytes(data[:cut])
            sessionfile.read_header(path, verify=True)
        _restore_refused(engine, data[:cut], folder, f"cut{cut}")


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(data=st.data())
def test_bit_flips_anywhere_are_refused(saved, data):
    engine, blob, folder = saved
    where = data.draw(st.integers(min_value=0, max_value=len(blob) - 1))
    bit = data.draw(st.integers(min_value=0, max_value=7))
    flipped = bytearray(blob)
    flipped[where] ^= 1 << bit
    _restore_refused(engine, bytes(flipped), folder, "flip")


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(field=st.sampled_from(["ledger", "messages", "pending", "pending_msg", "closing", "defaults", "edit_log",
                              "roll_strategy", "created", "n_cells", "name", "type_k", "model_fingerprint"]),
       value=json_values)
def test_well_checksummed_files_with_wrong_records_are_refused_or_restored_whole(saved, field, value):
    """A file whose checksum is right but whose header says anything at all."""
    engine, blob, folder = saved
    src = folder / "src.kvs"
    src.write_bytes(blob)
    dst = folder / "odd.kvs"
    try:
        sessionfile.rewrite(src, dst, **{field: value})
    except (OverflowError, TypeError, ValueError):
        return  # a value the file format cannot hold (an integer over 64 bits): no such file can exist
    before = engine.sessions()
    try:
        name = engine.restore(str(dst), "odd")
    except KvsideError as exc:
        assert exc.status < 500 or isinstance(exc, SessionFileError), exc.message
        assert engine.sessions() == before
        return
    engine.check(name)  # accepted: then it is whole and usable, or says clearly why not
    try:
        engine.chat(name, "More.", max_tokens=2, temperature=0).wait()
    except KvsideError as exc:
        assert exc.status < 500, exc.message
    engine.check(name)
    engine.delete_session(name)


@pytest.mark.parametrize("changes, message", [
    ({"version": 99}, "newer kvside"), ({"version": 0}, "invalid format version"),
    ({"version": "1"}, "invalid format version"), ({"format": "other-format"}, "not a kvside session"),
])
def test_foreign_and_future_versions_are_refused(saved, changes, message):
    engine, blob, folder = saved
    import msgpack

    head_len = int.from_bytes(blob[8:12], "little")
    header = msgpack.unpackb(blob[12:12 + head_len], raw=False)
    header.update(changes)
    packed = msgpack.packb(header, use_bin_type=True)
    import hashlib

    state = blob[12 + head_len:-32]
    data = blob[:8] + len(packed).to_bytes(4, "little") + packed + state + hashlib.sha256(packed + state).digest()
    path = folder / "foreign.kvs"
    path.write_bytes(data)
    with pytest.raises(SessionFileError, match=message):
        sessionfile.read_header(path, verify=True)
    _restore_refused(engine, data, folder, "foreign")
