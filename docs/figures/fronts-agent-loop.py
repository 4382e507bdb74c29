"""The same agent conversation through each API kvside speaks: OpenAI's chat completions, the
Responses API resending the whole history (as a stateless client does) and continuing with
previous_response_id (as Codex does), and Anthropic's messages. Each turn adds a tool output of
about 150 tokens and a question; what is measured is the turn's time to first token and how much
of its prompt came from the cache. One daemon, the fronts taking turns turn by turn.

    python docs/figures/fronts-agent-loop.py [--turns 6]      (the venv's python, repository root)
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

PROSE = sorted((Path(__file__).resolve().parents[2] / "tests" / "data" / "prose").glob("*.txt"))
SYSTEM = "You are a careful coding agent. Answer briefly."
PORT = 8991
URL = f"http://127.0.0.1:{PORT}"


def sse(path: str, body: dict) -> tuple[float, list[dict]]:
    """(seconds to the first text, every data object) of one streamed request."""
    t0, first, events = time.perf_counter(), None, []
    with httpx.stream("POST", URL + path, json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            events.append(data)
            text = ((data.get("choices") or [{}])[0].get("delta") or {}).get("content") if "choices" in data else None
            text = text or (data.get("delta") if data.get("type") == "response.output_text.delta" else None)
            text = text or ((data.get("delta") or {}).get("text") if data.get("type") == "content_block_delta" else None)
            if text and first is None:
                first = time.perf_counter() - t0
    return first or time.perf_counter() - t0, events


class Chat:
    name = "chat completions"

    def __init__(self):
        self.messages = [{"role": "system", "content": SYSTEM}]

    def turn(self, user: str) -> tuple[float, int, int]:
        self.messages.append({"role": "user", "content": user})
        ttft, events = sse("/v1/chat/completions", {"messages": self.messages, "max_tokens": 16, "temperature": 0,
                                                    "stream": True, "stream_options": {"include_usage": True}})
        text = "".join((e["choices"][0]["delta"].get("content") or "") for e in events if e.get("choices"))
        usage = next(e["usage"] for e in events if e.get("usage"))
        self.messages.append({"role": "assistant", "content": text})
        return ttft, usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"]


class Responses:
    def __init__(self, chained: bool):
        self.chained = chained
        self.name = "responses, previous_response_id" if chained else "responses, whole history"
        self.items: list[dict] = []
        self.last: str | None = None

    def turn(self, user: str) -> tuple[float, int, int]:
        item = {"role": "user", "content": user}
        body = {"instructions": SYSTEM, "max_output_tokens": 16, "temperature": 0, "stream": True,
                "input": [item] if self.chained else self.items + [item]}
        if self.chained and self.last:
            body["previous_response_id"] = self.last
        ttft, events = sse("/v1/responses", body)
        done = next(e["response"] for e in events if e.get("type") == "response.completed")
        self.items += [item, *done["output"]]
        self.last = done["id"]
        u = done["usage"]
        return ttft, u["input_tokens"], u["input_tokens_details"]["cached_tokens"]


class Messages:
    name = "anthropic messages"

    def __init__(self):
        self.messages: list[dict] = []

    def turn(self, user: str) -> tuple[float, int, int]:
        self.messages.append({"role": "user", "content": user})
        ttft, events = sse("/v1/messages", {"system": SYSTEM, "messages": self.messages, "max_tokens": 16,
                                            "temperature": 0, "stream": True})
        text = "".join(e["delta"]["text"] for e in events if e.get("type") == "content_block_delta")
        u = next(e["usage"] for e in events if e.get("type") == "message_delta")
        self.messages.append({"role": "assistant", "content": [{"type": "text", "text": text}]})
        return ttft, u["input_tokens"] + u["cache_read_input_tokens"], u["cache_read_input_tokens"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--turns", type=int, default=6)
    args = ap.parse_args()
    folder = tempfile.mkdtemp(prefix="kvside-fronts-")
    proc = subprocess.Popen([sys.executable, "-m", "kvside.cli", "serve", "-m", "smollm2-135m", "--port", str(PORT),
                             "--threads", "2", "--n-ctx", "4096", "--max-sessions", "4", "--sessions", folder],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            if httpx.get(URL + "/health").status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    fronts = [Chat(), Responses(False), Responses(True), Messages()]
    rows = {f.name: [] for f in fronts}
    try:
        for t in range(args.turns):
            tool_output = PROSE[t % len(PROSE)].read_text()[:600]
            user = f"The tool returned:\n{tool_output}\n\nWhat should we do next (turn {t})?"
            for k in range(len(fronts)):  # a different front goes first each turn
                front = fronts[(t + k) % len(fronts)]
                ttft, prompt, cached = front.turn(user)
                rows[front.name].append({"turn": t, "ttft_s": round(ttft, 3), "prompt_tokens": prompt,
                                         "cached_tokens": cached})
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    late = {name: {"ttft_median_s": statistics.median(r["ttft_s"] for r in rs[1:]),
                   "cached_of_prompt": f"{sum(r['cached_tokens'] for r in rs[1:])} of "
                                       f"{sum(r['prompt_tokens'] for r in rs[1:])}"} for name, rs in rows.items()}
    print(json.dumps({"turns": rows, "after_the_first_turn": late}, indent=1))


if __name__ == "__main__":
    main()
