"""The daemon under hostile clients: files named, never pathed; foreign origins, rebinding hosts and
simple (preflight-free) posts refused; one key middleware; hostile bodies get 4xx, never 5xx."""

import json

import httpx
import pytest

from conftest import LiveDaemon
from kvside.engine import Engine

KEY = "sec-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sec-sessions")
    engine = Engine(n_ctx=256, max_sessions=2, n_threads=2, sessions_dir=str(folder)).start()
    daemon = LiveDaemon(engine, api_key=KEY, keepalive_s=0.5)
    daemon.folder = folder
    yield daemon
    daemon.stop()
    engine.close()


@pytest.fixture(scope="module")
def open_live(tmp_path_factory):
    """The default a user gets: no API key."""
    engine = Engine(n_ctx=256, max_sessions=2, n_threads=2, sessions_dir=str(tmp_path_factory.mktemp("open"))).start()
    daemon = LiveDaemon(engine, allow_origins=("http://localhost:3000",))
    yield daemon
    daemon.stop()
    engine.close()


def chat(url, session, text="Hi.", headers=None):
    r = httpx.post(url + "/v1/chat/completions", headers={**AUTH, **(headers or {})}, timeout=120,
                   json={"messages": [{"role": "user", "content": text}], "max_tokens": 4, "temperature": 0,
                         "session": session})
    assert r.status_code == 200, r.text
    return r


# -- files: named, never pathed ----------------------------------------------------------------------
def test_save_with_a_path_is_refused_and_writes_nothing(live, tmp_path):
    chat(live.url, "files")
    target = tmp_path / "deep" / "evil.kvs"
    r = httpx.post(live.url + "/kvside/sessions/files/save", headers=AUTH, json={"path": str(target)})
    assert r.status_code == 400 and "kvside save NAME FILE" in r.json()["error"]["message"]
    assert not target.exists() and not target.parent.exists()


@pytest.mark.parametrize("name", ["../../etc/x", "/tmp/x", "a/b", ".hidden", "x" * 80, ""])
def test_save_as_a_bad_name_is_refused(live, name):
    chat(live.url, "files")
    r = httpx.post(live.url + "/kvside/sessions/files/save", headers=AUTH, json={"as": name})
    assert r.status_code == 400
    assert not list(live.folder.parent.glob("x*"))


def test_save_by_name_lands_in_the_sessions_folder_and_reveals_no_path(live):
    chat(live.url, "files")
    r = httpx.post(live.url + "/kvside/sessions/files/save", headers=AUTH, json={"as": "files-copy"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["file"] == "files-copy.kvs" and "path" not in body
    assert (live.folder / "files-copy.kvs").is_file()
    listed = httpx.get(live.url + "/kvside/sessions", headers=AUTH).json()["sessions"]
    assert "files-copy" in [s["name"] for s in listed]
    assert not any("path" in s for s in listed)
    # saving over another session's file is refused
    chat(live.url, "other")
    r = httpx.post(live.url + "/kvside/sessions/files/save", headers=AUTH, json={"as": "other"})
    assert r.status_code == 400


def test_restore_takes_names_not_paths(live, tmp_path):
    outside = tmp_path / "outside.kvs"
    outside.write_bytes(b"not a session")
    for body in ({"path": str(outside)}, {"path": "/etc/passwd"}):
        r = httpx.post(live.url + "/kvside/restore", headers=AUTH, json=body)
        assert r.status_code == 400 and "kvside restore FILE" in r.json()["error"]["message"]
    # a missing name says nothing about files outside the folder
    r = httpx.post(live.url + "/kvside/restore", headers=AUTH, json={"session": "nobody-here"})
    assert r.status_code == 404 and str(tmp_path) not in r.text
    r = httpx.post(live.url + "/kvside/restore", headers=AUTH, json={"session": "../outside"})
    assert r.status_code == 400


def test_restore_by_name_round_trip(live):
    chat(live.url, "keeper", "Remember the word lantern.")
    assert httpx.post(live.url + "/kvside/sessions/keeper/save", headers=AUTH, json={"as": "keeper-saved"}).status_code == 200
    r = httpx.post(live.url + "/kvside/restore", headers=AUTH, json={"session": "keeper-saved", "name": "keeper-back"})
    assert r.status_code == 200, r.text
    shown = httpx.get(live.url + "/kvside/sessions/keeper-back", headers=AUTH).json()
    assert any("lantern" in m["content"] for m in shown["messages"])


def test_download_and_upload_move_bytes_not_paths(live, tmp_path):
    chat(live.url, "mover", "The code is 4417.")
    r = httpx.get(live.url + "/kvside/sessions/mover/file", headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    blob = r.content
    r = httpx.put(live.url + "/kvside/sessions/mover-2/file", content=blob,
                  headers={**AUTH, "Content-Type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    shown = httpx.get(live.url + "/kvside/sessions/mover-2", headers=AUTH).json()
    assert any("4417" in m["content"] for m in shown["messages"])
    # a damaged upload is refused and leaves no file behind
    before = sorted(p.name for p in live.folder.iterdir())
    r = httpx.put(live.url + "/kvside/sessions/broken/file", content=blob[:-10] + b"0123456789",
                  headers={**AUTH, "Content-Type": "application/octet-stream"})
    assert r.status_code == 400, r.text
    assert sorted(p.name for p in live.folder.iterdir()) == before
    # an upload is only an upload with the octet-stream type (a form post cannot make one)
    r = httpx.put(live.url + "/kvside/sessions/mover-3/file", content=blob, headers={**AUTH, "Content-Type": "text/plain"})
    assert r.status_code == 415


# -- browsers -----------------------------------------------------------------------------------------
def test_simple_cross_site_posts_are_refused(open_live):
    """What any web page can send without a preflight: text/plain, a form, or nothing."""
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"Content-Type": ctype} if ctype else {}
        r = httpx.post(open_live.url + "/v1/chat/completions", content=body, headers=headers)
        assert r.status_code == 415, (ctype, r.status_code)
    r = httpx.post(open_live.url + "/kvside/sessions/x/save", content="{}", headers={"Content-Type": "text/plain"})
    assert r.status_code == 415


def test_foreign_origins_are_refused_and_allowed_ones_get_cors(open_live):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}
    r = httpx.post(open_live.url + "/v1/chat/completions", json=body, headers={"Origin": "https://evil.example"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
    r = httpx.options(open_live.url + "/v1/chat/completions", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    r = httpx.options(open_live.url + "/v1/chat/completions", headers={
        "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"})
    assert r.status_code == 204 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
    r = httpx.post(open_live.url + "/v1/chat/completions", json=body, headers={"Origin": "http://localhost:3000"},
                   timeout=120)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000"


@pytest.mark.parametrize("host, status", [
    ("evil.example", 403), ("evil.example:8077", 403), ("127.0.0.1.evil.example", 403), ("10.0.0.8", 403),
    ("localhost", 200), ("127.0.0.1:1234", 200), ("[::1]:8077", 200), ("LOCALHOST.", 200),
])
def test_host_header_must_name_this_daemon(open_live, host, status):
    r = httpx.get(open_live.url + "/v1/models", headers={"Host": host})
    assert r.status_code == status, r.text


# -- one key middleware -------------------------------------------------------------------------------
@pytest.mark.parametrize("method, path", [
    ("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/infill"),
    ("GET", "/kvside/sessions"), ("GET", "/kvside/sessions/x"), ("DELETE", "/kvside/sessions/x"),
    ("POST", "/kvside/sessions/x/roll"), ("POST", "/kvside/restore"), ("GET", "/kvside/sessions/x/file"),
    ("PUT", "/kvside/sessions/x/file"), ("GET", "/no/such/route"), ("GET", "/props"), ("POST", "/tokenize"),
    ("POST", "/detokenize"), ("POST", "/apply-template"), ("GET", "/models"), ("GET", "/api/tags"),
    ("POST", "/api/chat"), ("POST", "/api/generate"), ("POST", "/api/show"), ("GET", "/api/version"),
    ("GET", "/metrics"),
])
def test_every_route_but_health_needs_the_key(live, method, path):
    r = httpx.request(method, live.url + path, headers=JSON, content=b"{}")
    assert r.status_code == 401, (path, r.status_code)
    r = httpx.request(method, live.url + path, headers={**JSON, "Authorization": "Bearer nope"}, content=b"{}")
    assert r.status_code == 401
    assert httpx.get(live.url + "/health").status_code == 200
    assert httpx.get(live.url + "/v1/models", headers={"X-Api-Key": KEY}).status_code == 200


# -- hostile bodies -----------------------------------------------------------------------------------
@pytest.mark.parametrize("body", [
    b"[" * 100000 + b"]" * 100000,
    b'{"a":' * 50000 + b"1" + b"}" * 50000,
    b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": ' + b"9" * 5000 + b"}",
    b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
    b'{"messages": [{"role": "user", "content": "x"}], "temperature": Infinity}',
    b'{"messages": [{"role": "user", "content": "x"}], "seed": 99999999999999999999999}',
    b'{"messages": [{"role": "user", "content": "x"}], "top_k": 99999999999999}',
    b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 1e308}',
    b'{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}',
])
def test_hostile_json_gets_a_4xx(live, body):
    r = httpx.post(live.url + "/v1/chat/completions", content=body, headers={**AUTH, **JSON}, timeout=120)
    assert 400 <= r.status_code < 500, (body[:60], r.status_code, r.text[:200])
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(live.url + "/health").json()["status"] == "ok"
