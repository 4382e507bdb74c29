"""A sessions folder shared by several daemons: one owner per session at a time, hand-over on
request, dead daemons' sessions reopened elsewhere; and the fleet recipe, HAProxy in front of two
real `kvside serve` processes, with one of them drained mid-run."""

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from kvside.engine import Engine
from kvside.engine.fleet import Leases, SessionElsewhere

from conftest import GREEDY, LiveDaemon


# -- leases, no model -------------------------------------------------------------------------------
def test_one_daemon_holds_a_session_at_a_time(tmp_path):
    a, b = Leases(tmp_path), Leases(tmp_path)
    a.claim("trip")
    a.claim("trip")  # holding it already is fine
    assert not b.try_claim("trip")
    assert b.owner_elsewhere("trip") == a.me
    with pytest.raises(SessionElsewhere) as err:
        b.claim("trip")
    assert err.value.status == 409 and "another daemon" in err.value.message
    a.release("trip")
    assert b.owner_elsewhere("trip") is None
    b.claim("trip")
    assert a.owner_elsewhere("trip") == b.me


def test_a_dead_daemon_on_this_host_lets_go_at_once(tmp_path):
    a, b = Leases(tmp_path), Leases(tmp_path)
    a.claim("trip")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a process id that no longer exists
    beat = tmp_path / ".fleet" / "daemons" / a.me
    beat.write_text(json.dumps(dict(json.loads(beat.read_text()), pid=gone.pid, beat=time.time())))
    assert not b.alive(a.me)
    assert b.try_claim("trip")
    assert b.holder("trip") == b.me


def test_a_daemon_elsewhere_is_dead_when_its_heartbeat_is_older_than_the_ttl(tmp_path):
    a, b = Leases(tmp_path, ttl_s=5), Leases(tmp_path, ttl_s=5)
    a.claim("trip")
    beat = tmp_path / ".fleet" / "daemons" / a.me
    info = json.loads(beat.read_text())
    beat.write_text(json.dumps(dict(info, host="elsewhere", pid=1, beat=time.time() - 1)))
    assert not b.try_claim("trip")  # fresh: alive, whatever its pid means here
    beat.write_text(json.dumps(dict(info, host="elsewhere", pid=1, beat=time.time() - 6)))
    assert b.try_claim("trip")


def test_a_daemon_that_left_cleanly_holds_nothing(tmp_path):
    a, b = Leases(tmp_path), Leases(tmp_path)
    a.claim("x")
    a.claim("y")
    a.close()
    assert b.holder("x") is None and b.holder("y") is None
    assert all(row["daemon"] != a.me for row in b.daemons())


def test_asking_for_a_session_and_giving_up(tmp_path):
    a, b = Leases(tmp_path), Leases(tmp_path)
    a.claim("trip")
    assert a.wanted() == []
    b.ask("trip")
    assert a.wanted() == ["trip"]
    assert b.wanted() == []  # b holds nothing
    b.withdraw("trip")
    assert a.wanted() == []
    b.ask("trip")
    a.release("trip")
    b.claim("trip")  # the want is answered
    assert not (tmp_path / ".fleet" / "wants" / "trip").exists()


def test_the_journal_orders_owners(tmp_path):
    a, b = Leases(tmp_path), Leases(tmp_path)
    a.claim("trip")
    a.release("trip")
    b.claim("trip")
    b.release("trip")
    spans = journal_spans(tmp_path)
    assert [d for d, _, _ in spans["trip"]] == [a.me, b.me]
    assert_no_overlap(spans)


def journal_spans(folder: Path, dead_at: dict | None = None) -> dict[str, list[tuple[str, float, float]]]:
    """Per session, the spans during which each daemon had it open, from the daemons' journals.
    A span a daemon never closed ends when it died (`dead_at`: daemon -> time) or is still open."""
    spans: dict[str, list] = {}
    for journal in (folder / ".fleet" / "journal").iterdir():
        opened: dict[str, float] = {}
        for line in journal.read_text().splitlines():
            t, what, name = line.split()
            if what == "open":
                opened[name] = float(t)
            else:
                spans.setdefault(name, []).append((journal.name, opened.pop(name), float(t)))
        for name, t in opened.items():
            spans.setdefault(name, []).append((journal.name, t, (dead_at or {}).get(journal.name, float("inf"))))
    return {name: sorted(rows, key=lambda r: r[1]) for name, rows in spans.items()}


def assert_no_overlap(spans: dict) -> None:
    for name, rows in spans.items():
        for (d1, _, end), (d2, start, _) in zip(rows, rows[1:]):
            assert end <= start, f"session {name} was open on {d1} and {d2} at once"


# -- two daemons in this process, one shared folder --------------------------------------------------
@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shared")
    engines = [Engine(n_ctx=512, max_sessions=2, n_threads=1, persist=True, shared_sessions=True,
                      sessions_dir=str(folder)).start() for _ in range(2)]
    lives = [LiveDaemon(e) for e in engines]
    yield folder, [live.url for live in lives], engines
    for live in lives:
        live.stop()
    for e in engines:
        e.close()


def chat(url: str, messages: list[dict], session: str | None = None, max_tokens: int = 8, **extra) -> httpx.Response:
    headers = {"X-Kvside-Session": session} if session else {}
    return httpx.post(url + "/v1/chat/completions", headers=headers, timeout=120,
                      json={"messages": messages, "max_tokens": max_tokens, **GREEDY, **extra})


def turn(url: str, history: list[dict], text: str, session: str | None = None, **extra) -> tuple[list[dict], dict]:
    r = chat(url, history + [{"role": "user", "content": text}], session, **extra)
    assert r.status_code == 200, r.text
    body = r.json()
    reply = body["choices"][0]["message"]["content"]
    return history + [{"role": "user", "content": text}, {"role": "assistant", "content": reply}], body


def resident(url: str, name: str) -> bool:
    rows = httpx.get(url + "/kvside/sessions", timeout=30).json()["sessions"]
    return any(r["name"] == name and r["resident"] for r in rows)


def test_a_session_moves_to_the_daemon_asked_for_it(pair):
    folder, (a, b), _ = pair
    history, _ = turn(a, [], "My name is Ada. Say hi.", session="moving")
    assert resident(a, "moving")
    history, body = turn(b, history, "What is my name?", session="moving")
    # b opened a's saved session: everything a held was reused, only the new turn was read
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] >= 20
    assert resident(b, "moving") and not resident(a, "moving")
    shown = httpx.get(b + "/kvside/sessions/moving", timeout=30).json()
    assert [m["content"] for m in shown["messages"] if m["role"] == "user"] == ["My name is Ada. Say hi.", "What is my name?"]
    # and back, through the session endpoints too
    assert httpx.get(a + "/kvside/sessions/moving", timeout=30).status_code == 200
    assert resident(a, "moving") and not resident(b, "moving")
    assert_no_overlap(journal_spans(folder))


def test_a_busy_session_is_handed_over_after_its_reply(pair):
    folder, (a, b), _ = pair
    history, _ = turn(a, [], "Count from one to twenty.", session="busy")
    long_reply: dict = {}

    def write_long():
        long_reply["body"] = turn(a, history, "Again, slowly, in words.", session="busy", max_tokens=48)[1]

    writer = threading.Thread(target=write_long)
    writer.start()
    for _ in range(200):  # until a is writing
        rows = httpx.get(a + "/kvside/sessions", timeout=30).json()["sessions"]
        if any(r["name"] == "busy" and r.get("busy") for r in rows):
            break
        time.sleep(0.02)
    shown = httpx.get(b + "/kvside/sessions/busy", timeout=60).json()  # waits for a's reply
    writer.join()
    said = long_reply["body"]["choices"][0]["message"]["content"]
    assert shown["messages"][-1]["role"] == "assistant" and shown["messages"][-1]["content"] == said
    assert long_reply["body"]["choices"][0]["finish_reason"] in ("stop", "length")  # not cut short by the move


def test_daemons_never_give_two_sessions_one_name(pair):
    folder, (a, b), _ = pair
    names = set()
    for i in range(3):
        for url in (a, b):
            r = chat(url, [{"role": "user", "content": f"Hello number {i} from {url[-5:]}."}], max_tokens=2)
            assert r.status_code == 200, r.text
            names.add(r.headers["x-kvside-session"])
    assert len(names) == 6


def test_a_sessionless_conversation_continues_from_the_cache_its_old_daemon_left(pair):
    folder, (a, b), engines = pair
    history, first = turn(a, [{"role": "system", "content": "You are terse."}],
                          "Remember: the harbour gate code is 7431. Acknowledge.")
    history, _ = turn(a, history, "Which code did I give you?")
    r = chat(a, history + [{"role": "user", "content": "Say it once more."}], max_tokens=2)
    name = r.headers["x-kvside-session"]
    assert name.startswith("auto-")
    engines[0].evict(name)  # as a drain does: saved, let go
    history += [{"role": "user", "content": "Say it once more."},
                {"role": "assistant", "content": r.json()["choices"][0]["message"]["content"]}]
    history, body = turn(b, history, "And the code again?")
    # b found a's session in the folder: only the new turn was read
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] >= first["usage"]["prompt_tokens"]
    assert resident(b, name)
    # one held by a live daemon is not taken from under it: a request without a name is read anew
    history2, _ = turn(b, [{"role": "system", "content": "You are terse."}], "Count to three.")
    r = chat(a, history2 + [{"role": "user", "content": "Again."}], max_tokens=2)
    usage = r.json()["usage"]
    assert r.status_code == 200 and usage["prompt_tokens_details"]["cached_tokens"] < usage["prompt_tokens"] / 2


def test_a_daemon_that_lost_its_lease_drops_the_session_instead_of_overwriting_it(pair):
    folder, (a, b), engines = pair
    history, _ = turn(a, [], "Remember the word lantern.", session="lost")
    saved = (folder / "lost.kvs").read_bytes()
    other = Leases(folder)  # a live daemon that took a for dead and opened the session
    (folder / ".fleet" / "leases" / "lost").write_text(json.dumps({"daemon": other.me, "since": time.time()}))
    assert resident(a, "lost")  # a still has it in its cache, and goes on with it (a direct call)
    # a's next reply ends, its save is refused (the other daemon beats), and the session leaves a's cache
    other.beat()
    stream = engines[0].chat("lost", "Which word?", max_tokens=4, **GREEDY)
    stream.wait()
    assert not resident(a, "lost")
    assert (folder / "lost.kvs").read_bytes() == saved  # the other daemon's file is untouched
    other.close()


def test_a_session_open_elsewhere_and_never_let_go_is_refused_with_409(pair, monkeypatch):
    folder, (a, b), engines = pair
    turn(a, [], "Hello.", session="stuck")
    monkeypatch.setattr("kvside.server.app.HANDOVER_S", 0.5)
    engines[0]._steward.stop()  # a stops answering hand-over requests
    try:
        r = chat(b, [{"role": "user", "content": "Hello."}], session="stuck")
        assert r.status_code == 409 and r.json()["error"]["code"] == "session_elsewhere"
        assert "did not let go" in r.json()["error"]["message"]
    finally:
        from kvside.engine.fleet import Steward

        engines[0]._steward = Steward(engines[0], engines[0].fleet)
        engines[0]._steward.start()
    assert not (folder / ".fleet" / "wants" / "stuck").exists()  # b gave up and said so
    assert resident(a, "stuck")


# -- the fleet recipe: HAProxy and two `kvside serve` processes ---------------------------------------
KVSIDE = str(Path(sys.executable).with_name("kvside"))


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_health(url: str, proc: subprocess.Popen) -> None:
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read().decode())
        time.sleep(0.1)
    raise AssertionError(f"{url} did not start")


def _serve(home: Path, folder: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "KVSIDE_HOME": str(home)}
    proc = subprocess.Popen([KVSIDE, "serve", "--port", str(port), "--n-ctx", "1024", "--threads", "1",
                             "--max-sessions", "4", "--shared-sessions", "--sessions", str(folder)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait_health(f"http://127.0.0.1:{port}", proc)
    return proc


@pytest.fixture
def fleet(tmp_path):
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed (Debian: apt-get install haproxy; .ci/run installs it)")
    folder = tmp_path / "shared"
    ports = [_port(), _port()]
    daemons = [_serve(tmp_path / f"home{i}", folder, port) for i, port in enumerate(ports)]
    listen = _port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(subprocess.run([KVSIDE, "proxy-config", "--listen", f"127.0.0.1:{listen}",
                                      *[a for p in ports for a in ("--daemon", f"127.0.0.1:{p}")],
                                      "--check-interval", "200ms"],
                                     capture_output=True, text=True, check=True).stdout)
    proxy = subprocess.Popen(["haproxy", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{listen}"
    _wait_health(url, proxy)
    yield folder, url, daemons, [f"http://127.0.0.1:{p}" for p in ports]
    proxy.terminate()
    for proc in daemons:
        if proc.poll() is None:
            proc.terminate()
    for proc in [proxy, *daemons]:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


CLIENTS, TURNS = 8, 4


def _turn_retrying(url: str, history: list[dict], text: str, session: str | None) -> tuple[list[dict], dict]:
    """A turn as a client of a fleet takes it: a request cut off by a daemon that died under it
    (the proxy answers 502) is sent again, and lands on another daemon."""
    for attempt in range(5):
        try:
            r = chat(url, history + [{"role": "user", "content": text}], session, max_tokens=6)
        except httpx.TransportError:
            r = None
        if r is not None and r.status_code == 200:
            reply = r.json()["choices"][0]["message"]["content"]
            return history + [{"role": "user", "content": text}, {"role": "assistant", "content": reply}], r.json()
        if r is not None and r.status_code not in (502, 503, 504):
            raise AssertionError(r.text)
        time.sleep(0.5)
    raise AssertionError(f"{session}: no answer after 5 tries")


def _run_clients(url: str, on_turn) -> dict:
    """CLIENTS conversations of TURNS turns through the proxy, each naming its session; on_turn(i, t)
    runs before client i's turn t. Returns each client's history and per-turn bodies."""
    out: dict = {}

    def client(i: int) -> None:
        history, bodies = [], []
        try:
            for t in range(TURNS):
                on_turn(i, t)
                history, body = _turn_retrying(url, history, f"Client {i}, turn {t}: remember the number {100 * i + t}.",
                                               session=f"client-{i}")
                bodies.append(body)
        except BaseException as exc:  # reported by the test, not lost in a thread
            out[i] = exc
            return
        out[i] = (history, bodies)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=600)
    return out


def _saved_users(folder: Path, name: str) -> list[str]:
    from kvside import sessionfile

    header = sessionfile.read_header(folder / f"{name}.kvs").header
    # live ones: a turn sent again because its reply was saved but never heard (the daemon was
    # killed in between) is a regenerate, and the file keeps the first try's records, masked
    return [m["content"] for m in header["messages"] if m["role"] == "user" and m["state"] == "live"]


def test_a_fleet_loses_nothing_when_a_daemon_drains_mid_run(fleet):
    folder, url, daemons, direct = fleet
    stopped = threading.Event()

    def on_turn(i: int, t: int) -> None:
        if t == 2 and i == 0 and not stopped.is_set():
            stopped.set()
            daemons[0].send_signal(15)  # SIGTERM: the daemon drains its sessions to the folder

    out = _run_clients(url, on_turn)
    errors = {i: r for i, r in out.items() if isinstance(r, BaseException)}
    assert not errors, errors
    assert daemons[0].wait(timeout=60) == 0
    for i, (history, bodies) in out.items():
        said = [m["content"] for m in history if m["role"] == "user"]
        assert _saved_users(folder, f"client-{i}") == said  # every turn, in order, in one session
        # later turns reused what the session held, wherever it was served
        assert all(b["usage"]["prompt_tokens_details"]["cached_tokens"] > 0 for b in bodies[1:]), \
            [b["usage"] for b in bodies]
    # the drained daemon let go of everything; the other one has the sessions that moved
    leases = folder / ".fleet" / "leases"
    assert all(json.loads(p.read_text())["daemon"] != _daemon_of(folder, daemons[0].pid) for p in leases.iterdir())
    assert_no_overlap(journal_spans(folder))
    moved = [n for n, rows in journal_spans(folder).items() if len({d for d, _, _ in rows}) > 1]
    assert moved, "no session moved: the drained daemon served none"


def _daemon_of(folder: Path, pid: int) -> str:
    return next(p.name for p in (folder / ".fleet" / "journal").iterdir() if f"-{pid}-" in p.name)


def test_a_fleet_reopens_a_killed_daemons_sessions_from_their_last_reply(fleet):
    folder, url, daemons, direct = fleet
    killed_at: dict = {}

    def on_turn(i: int, t: int) -> None:
        if t == 2 and i == 0 and not killed_at:
            killed_at["t"] = time.time()
            daemons[0].kill()  # SIGKILL: no drain; every reply was saved as it ended

    out = _run_clients(url, on_turn)
    errors = {i: r for i, r in out.items() if isinstance(r, BaseException)}
    assert not errors, errors
    dead = _daemon_of(folder, daemons[0].pid)
    for i, (history, bodies) in out.items():
        said = [m["content"] for m in history if m["role"] == "user"]
        assert _saved_users(folder, f"client-{i}") == said
    assert_no_overlap(journal_spans(folder, dead_at={dead: killed_at["t"]}))
    # the dead daemon's sessions were taken over: every lease now names the live one
    assert all(json.loads(p.read_text())["daemon"] != dead for p in (folder / ".fleet" / "leases").iterdir())


def test_sessionless_conversations_stay_on_one_daemon_and_move_with_their_cache(fleet):
    folder, url, daemons, direct = fleet
    chats = []
    for i in range(6):  # by chance (round robin), all six would stay put once in 64 runs
        history, first = turn(url, [{"role": "system", "content": "Be brief."}], f"Conversation {i}.")
        history, second = turn(url, history, "Go on.")
        # the second turn reached the daemon holding the first: all of it was reused
        assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= first["usage"]["prompt_tokens"]
        chats.append((history, second))
    daemons[0].send_signal(15)  # drained: its conversations go to the other daemon, and their sessions
    assert daemons[0].wait(timeout=60) == 0
    for history, second in chats:
        _, third = _turn_retrying(url, history, "And then?", session=None)
        assert third["usage"]["prompt_tokens_details"]["cached_tokens"] >= second["usage"]["prompt_tokens"]
