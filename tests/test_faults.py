"""A real `kvside serve` process killed with SIGKILL in the middle of a save: the previous file is
intact, every other session file is readable, and a restart lists and restores them all."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from kvside import sessionfile

KVSIDE = str(Path(sys.executable).with_name("kvside"))
LONG = " ".join(f"Line {i}: the harbour lights were counted twice before the night shift began." for i in range(40))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(home: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "KVSIDE_HOME": str(home)}
    proc = subprocess.Popen([KVSIDE, "serve", "--port", str(port), "--n-ctx", "1024", "--threads", "2",
                             "--max-sessions", "2"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read().decode())
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("the daemon did not start")


def chat(url: str, session: str, text: str) -> None:
    r = httpx.post(url + "/v1/chat/completions", timeout=300, json={
        "messages": [{"role": "user", "content": text}], "max_tokens": 4, "temperature": 0, "session": session})
    assert r.status_code == 200, r.text


def test_kill_9_during_a_save_leaves_every_file_whole(tmp_path):
    home = tmp_path / "home"
    folder = home / "sessions"
    port = _port()
    url = f"http://127.0.0.1:{port}"
    proc = serve(home, port)
    try:
        chat(url, "big", LONG)
        chat(url, "other", "A short one.")
        timing = httpx.post(url + "/kvside/sessions/big/save", json={}, timeout=120).json()
        assert httpx.post(url + "/kvside/sessions/other/save", json={}, timeout=120).status_code == 200
        old_big = (folder / "big.kvs").read_bytes()
        old_other = (folder / "other.kvs").read_bytes()
        chat(url, "big", "One more line, so the next save differs.")
        # kill the daemon halfway through the next save of "big"
        def save_big():
            try:
                httpx.post(url + "/kvside/sessions/big/save", json={}, timeout=30)
            except httpx.HTTPError:
                pass  # the daemon died under it, as intended

        saver = threading.Thread(target=save_big, daemon=True)
        saver.start()
        deadline = time.monotonic() + 30
        while not list(folder.glob(".big.kvs.*")) and time.monotonic() < deadline:
            time.sleep(0.0005)  # until the new file is being written
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        saver.join(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    left = [p.name for p in folder.iterdir() if p.name.startswith(".big.kvs.")]
    assert left, f"the kill did not land during the save (it took {timing['t_save_s']:.3f} s)"
    big = (folder / "big.kvs").read_bytes()
    assert big == old_big  # the half-written new file never replaced it
    assert (folder / "other.kvs").read_bytes() == old_other
    for path in folder.glob("*.kvs"):
        assert sessionfile.read_header(path, verify=True).checksum_ok

    (folder / ".upload-abc123.kvs").write_bytes(b"half an upload")  # what a kill during an upload leaves
    proc = serve(home, port)
    try:
        assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # the restart cleared the leftovers
        names = {s["name"] for s in httpx.get(url + "/kvside/sessions").json()["sessions"]}
        assert {"big", "other"} <= names
        for name in ("big", "other"):
            shown = httpx.get(f"{url}/kvside/sessions/{name}", timeout=120)  # restored from its file
            assert shown.status_code == 200 and shown.json()["session"]["n_cells"] > 0
            chat(url, name, "Still there?")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
