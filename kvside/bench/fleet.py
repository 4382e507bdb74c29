"""`kvside bench fleet`: two `kvside serve --shared-sessions` daemons on loopback sharing one
sessions folder. A conversation of --ctx tokens is continued, one turn each (the time of a one-token
reply, from request to response: reading the new turn, the token, and, shared, saving the session):

  owner      on the daemon that holds it (its cache is warm: the reference for a sticky proxy)
  hand-over  on the other daemon, while the owner is alive (the owner saves and evicts, the other
             restores the file, then reads the new turn)
  takeover   on the other daemon after the owner was killed (SIGKILL; the lease is broken at once
             on the same host, the file is the one saved after the last reply)
  re-prefill the same messages on a daemon that holds nothing of them (what a fleet without a
             shared folder pays when a conversation changes daemon)

and SIGTERM's drain: how long a daemon holding --sessions sessions takes to save them and exit."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from kvside.bench import median
from kvside.errors import KvsideError

KVSIDE = str(Path(sys.executable).with_name("kvside"))


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Daemon:
    def __init__(self, home: Path, folder: Path, model: str | None, n_ctx: int, threads: int, shared: bool = True):
        self.port = _port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [KVSIDE, "serve", "--port", str(self.port), "--n-ctx", str(n_ctx), "--threads", str(threads),
                "--max-sessions", "4", "--sessions", str(folder), "--max-models", "1"]
        # the daemon alone holds nothing of anyone's conversation: every request reads it all
        args += ["--shared-sessions"] if shared else ["--no-reuse"]
        args += ["--model", model] if model else []
        self.proc = subprocess.Popen(args, env={**os.environ, "KVSIDE_HOME": str(home)},
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for _ in range(1200):
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise KvsideError(f"a daemon did not start: {self.proc.stderr.read().decode()[-400:]}")
            time.sleep(0.1)
        self.stop()
        raise KvsideError("a daemon did not start within 120 s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _turn(url: str, session: str | None, messages: list[dict]) -> tuple[float, dict]:
    headers = {"X-Kvside-Session": session} if session else {}
    t0 = time.perf_counter()
    r = httpx.post(url + "/v1/chat/completions", headers=headers, timeout=600,
                   json={"messages": messages, "max_tokens": 1, "temperature": 0})
    dt = time.perf_counter() - t0
    if r.status_code != 200:
        raise KvsideError(f"{url}: {r.status_code} {r.text[:200]}")
    return dt, r.json()["usage"]


def _history(words: int, turn: int) -> list[dict]:
    text = " ".join(f"w{i % 97}" for i in range(words))
    return [{"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": f"Read this and wait: {text}"},
            {"role": "assistant", "content": "Done."},
            {"role": "user", "content": f"Question {turn}: what did you read?"}]


def run(model: str | None, ctx_words: int, reps: int, threads: int, drain_sessions: int) -> dict:
    root = Path(tempfile.mkdtemp(prefix="kvside-bench-fleet-"))
    folder = root / "shared"
    n_ctx = max(1024, int(ctx_words * 4) + 256)  # a "wNN" word is about 3 tokens
    a = _Daemon(root / "a", folder, model, n_ctx, threads)
    b = _Daemon(root / "b", folder, model, n_ctx, threads)
    lone = None
    rows: dict[str, list[float]] = {"owner": [], "hand-over": [], "takeover": [], "re-prefill": []}
    cached: dict[str, list[int]] = {k: [] for k in rows}
    prompt_tokens = 0
    try:
        lone = _Daemon(root / "c", root / "alone", model, n_ctx, threads, shared=False)
        for rep in range(reps):
            name = f"bench-{rep}"
            _turn(a.url, name, _history(ctx_words, 0)[:2])  # the long turn, read once
            for label, url in (("owner", a.url), ("hand-over", b.url)):
                dt, usage = _turn(url, name, _history(ctx_words, rep))
                rows[label].append(dt)
                cached[label].append(usage["prompt_tokens_details"]["cached_tokens"])
                prompt_tokens = usage["prompt_tokens"]
            dt, usage = _turn(lone.url, None, _history(ctx_words, 1000 + rep))
            rows["re-prefill"].append(dt)
            cached["re-prefill"].append(usage["prompt_tokens_details"]["cached_tokens"])
        # takeover: b holds every session now; kill it and continue each on a new daemon
        b.proc.send_signal(signal.SIGKILL)
        b.proc.wait()
        for rep in range(reps):
            dt, usage = _turn(a.url, f"bench-{rep}", _history(ctx_words, 2000 + rep))
            rows["takeover"].append(dt)
            cached["takeover"].append(usage["prompt_tokens_details"]["cached_tokens"])
        # drain: `drain_sessions` sessions resident on a, SIGTERM, time to exit
        for i in range(drain_sessions):
            _turn(a.url, f"drain-{i}", _history(ctx_words // 4, i))
        t0 = time.perf_counter()
        a.proc.send_signal(signal.SIGTERM)
        code = a.proc.wait(timeout=120)
        t_drain = time.perf_counter() - t0
        saved = sum(1 for i in range(drain_sessions) if (folder / f"drain-{i}.kvs").exists())
    finally:
        for d in (a, b, lone):
            if d is not None:
                d.stop()
    return {"model": model or "default", "prompt_tokens": prompt_tokens, "reps": reps, "threads": threads,
            "ttft_s": {k: median(v) for k, v in rows.items()},
            "cached_tokens": {k: int(median(v)) for k, v in cached.items()},
            "drain": {"sessions": drain_sessions, "t_exit_s": t_drain, "exit_code": code, "saved": saved}}


def table(result: dict) -> str:
    lines = [f"fleet of 2 daemons, one shared folder; a conversation of {result['prompt_tokens']} prompt tokens, "
             f"median of {result['reps']}",
             f"{'next turn':12} {'reply s':>8} {'cached':>8}"]
    for key in ("owner", "hand-over", "takeover", "re-prefill"):
        lines.append(f"{key:12} {result['ttft_s'][key]:8.3f} {result['cached_tokens'][key]:8d}")
    d = result["drain"]
    lines.append(f"SIGTERM with {d['sessions']} sessions: exit {d['exit_code']} after {d['t_exit_s']:.2f} s, "
                 f"{d['saved']} saved")
    return "\n".join(lines)
