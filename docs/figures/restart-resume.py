"""A conversation that comes back after the daemon restarted: the next turn's time to first token
on the restarted daemon (whose sessions folder holds the conversation's saved session) against a
daemon with an empty folder (what kvside did before request binding matched saved sessions after
a restart: read everything again). Run with the venv's python from the repository root:

    python docs/figures/restart-resume.py [--conversations 3] [--n-ctx 2048]

Prints JSON: per conversation, prompt tokens, cached tokens and TTFT for both daemons."""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

PROSE = sorted((Path(__file__).resolve().parents[2] / "tests" / "data" / "prose").glob("*.txt"))


def start(folder: Path, port: int, n_ctx: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "kvside.cli", "serve", "-m", "smollm2-135m", "--port", str(port),
                             "--threads", "2", "--n-ctx", str(n_ctx), "--max-sessions", "2", "--sessions", str(folder)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit("the daemon did not start")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)  # drains and saves its sessions
    proc.wait(timeout=120)


def turn(port: int, messages: list[dict], max_tokens: int) -> tuple[str, float, dict]:
    """(reply, seconds to the first token, usage) of one streamed request."""
    t0, first, text, usage = time.perf_counter(), None, [], {}
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                piece = choice["delta"].get("content")
                if piece:
                    first = first or time.perf_counter() - t0
                    text.append(piece)
    return "".join(text), first or time.perf_counter() - t0, usage


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--conversations", type=int, default=3)
    ap.add_argument("--n-ctx", type=int, default=2048)
    args = ap.parse_args()
    runs = []
    for k in range(args.conversations):
        root = Path(tempfile.mkdtemp(prefix="kvside-resume-"))
        saved, empty = root / "saved", root / "empty"
        empty.mkdir()
        messages = [{"role": "system", "content": "You are a careful reader. Answer in one sentence."}]
        d = start(saved, 8981, args.n_ctx)
        for i in range(4):  # four turns, each quoting a text to talk about
            doc = PROSE[(k * 4 + i) % len(PROSE)].read_text()[:1100]
            messages.append({"role": "user", "content": f"Here is a passage:\n\n{doc}\n\nWhat is it about?"})
            reply, _, _ = turn(8981, messages, 24)
            messages.append({"role": "assistant", "content": reply})
        stop(d)
        messages.append({"role": "user", "content": "Which of the passages did you like best, and why?"})
        result = {}
        for label, folder, port in (("restarted", saved, 8982), ("empty folder", empty, 8983)):
            d = start(folder, port, args.n_ctx)
            _, ttft, usage = turn(port, messages, 8)
            stop(d)
            result[label] = {"ttft_s": round(ttft, 3), "prompt_tokens": usage.get("prompt_tokens"),
                             "cached_tokens": usage.get("prompt_tokens_details", {}).get("cached_tokens")}
        runs.append(result)
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({"runs": runs, "ttft_median_s": {
        label: statistics.median(r[label]["ttft_s"] for r in runs) for label in ("restarted", "empty folder")}},
        indent=1))


if __name__ == "__main__":
    main()
