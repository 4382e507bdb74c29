"""`kvside bench serve`: a 20-turn chat sent as full message arrays, the way an editor sends it;
once the history passes a budget the oldest turns are dropped from the front. In one run, each daemon with one session's worth of
cache (as llama-server with one slot): kvside with reuse, kvside without reuse, kvside told the session explicitly and sent only the new turn
(the time to prefill the new turn alone), and llama.cpp's llama-server with --cache-reuse 256
when `make peer` has built it. Then a load run: concurrent streaming clients, a quarter of them
leaving early, against kvside with four resident sessions and llama-server with four slots."""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from kvside.models import resolve

QUESTIONS = [
    "What is a hash table?", "How does a linked list differ from an array?", "Explain binary search.",
    "What is a closure in Python?", "Why are tuples immutable?", "What does a garbage collector do?",
    "What is a race condition?", "How does TCP differ from UDP?", "What is a B-tree used for?",
    "What is memoization?", "Explain recursion with an example.", "What is a deadlock?",
    "What is the difference between a process and a thread?", "What is a REST API?",
    "How do databases use indexes?", "What is a Bloom filter?", "Explain big-O notation.",
    "What is a mutex?", "What is lazy evaluation?", "What does a compiler do?",
]
SYSTEM = "You are a concise programming assistant. Answer in two sentences."
PEER = Path(__file__).resolve().parents[2] / "build" / "peer" / "bin" / "llama-server"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(base: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError("server did not become healthy")


def _start(kind: str, model: Path, n_ctx: int, threads: int, home: str, sessions: int = 1,
           extra: list[str] = ()) -> tuple[subprocess.Popen, str]:
    port = _port()
    if kind == "llama-server":
        # -c is shared by the slots: n_ctx for each of them, as each kvside session has
        cmd = [str(PEER), "-m", str(model), "-c", str(n_ctx * sessions), "--cache-reuse", "256", "--port", str(port),
               "-t", str(threads), "-np", str(sessions), "--no-webui"]
    else:
        cmd = [sys.executable, "-m", "kvside.cli", "serve", "--model", str(model), "--n-ctx", str(n_ctx),
               "--port", str(port), "--threads", str(threads), "--max-sessions", str(sessions)]
        if kind == "kvside-noreuse":
            cmd.append("--no-reuse")
    cmd += list(extra)
    env = dict(os.environ, KVSIDE_HOME=home)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    base = f"http://127.0.0.1:{port}"
    _wait(base, proc)
    return proc, base


def _stop(proc: subprocess.Popen) -> None:
    """End a server started by _start: politely, then for good."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _concurrently(clients: int, client) -> float:
    """Run client(0..clients-1) in threads at once; returns the wall time they took."""
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return time.perf_counter() - t0


def _stream(base: str, body: dict, headers: dict | None = None) -> dict:
    """One streamed chat request: time to first content, text, cached tokens."""
    t0 = time.perf_counter()
    ttft = None
    text = []
    usage = {}
    timings = {}
    body = dict(body, stream=True, stream_options={"include_usage": True})
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, headers=headers, timeout=300) as r:
        if r.status_code >= 400:
            raise RuntimeError(f"{base} answered {r.status_code}: {r.read().decode(errors='replace')[:300]}")
        session = r.headers.get("x-kvside-session")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk.get("timings"):
                timings = chunk["timings"]
            for choice in chunk.get("choices", []):
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    text.append(piece)
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    if cached is None:
        cached = timings.get("cache_n", 0)
    return {"ttft_s": ttft if ttft is not None else time.perf_counter() - t0, "text": "".join(text),
            "cached_tokens": cached, "prompt_tokens": usage.get("prompt_tokens") or timings.get("prompt_n", 0),
            "session": session, "prompt_ms": timings.get("prompt_ms")}


FIDELITY_TOKENS = 32  # of each reply, teacher-forced on the edited cache and on a re-prefill


def _fidelity(base: str, session: str | None) -> dict:
    """kvside's measurement of a session's cache against a re-prefill of its tokens, on the reply
    just given (POST /kvside/sessions/{name}/fidelity); {} where there is none to ask."""
    if not session:
        return {}
    r = httpx.post(f"{base}/kvside/sessions/{session}/fidelity", json={"tokens": FIDELITY_TOKENS}, timeout=600)
    if r.status_code != 200:
        return {}
    out = r.json()
    return {"kl": out["kl"], "top1": out["top1"], "position_gaps": out["position_gaps"]}


def chat_run(base: str, turns: int, budget_chars: int, max_tokens: int, explicit: bool):
    """The editor's chat, one turn per step: yields each turn's row."""
    history: list[dict] = []
    headers = {"X-Kvside-Session": "bench-explicit"} if explicit else None
    for i in range(turns):
        user = {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}
        history.append(user)
        dropped = 0
        while sum(len(m["content"]) for m in history) > budget_chars and len(history) > 2:
            del history[:2]  # the editor drops the oldest exchange
            dropped += 1
        messages = [{"role": "system", "content": SYSTEM}] + history
        sent = [user] if explicit and i > 0 else messages
        if explicit and i == 0:
            sent = messages
        r = _stream(base, {"messages": sent, "max_tokens": max_tokens, "temperature": 0}, headers)
        history.append({"role": "assistant", "content": r["text"]})
        yield {"turn": i, "ttft_s": r["ttft_s"], "cached_tokens": r["cached_tokens"],
               "prompt_tokens": r["prompt_tokens"], "dropped_exchanges": dropped}


# What agents and editors do to their history, as `--client` modes (the chat is an agent's: a task,
# then each turn a tool result of about 90 words and the model's answer):
CLIENTS = {
    "front": "drops the oldest exchange after the system prompt when over budget (editors)",
    "cline": "keeps the first task message, drops the oldest exchange after it when over budget",
    "placeholder": "replaces tool outputs older than the last two by a short placeholder (micro-compaction)",
    "clock": "a clock in the system prompt changes every turn; drops the oldest exchange when over budget",
    "edit": "adds a requirement to its first (task) message every third turn; drops as cline does",
    "tools": "sends tool definitions and enables one more tool every third turn; drops as cline does",
    "shared": "two agents with the same long system prompt and tools take turns, one session each; "
              "each drops as cline does",
    "regenerate": "asks for another reply to every turn (the same history again, as a chat app's regenerate or "
                  "a client's retry; the turn's figures are the second reply's); drops as front does",
}
TOOL_WORDS = ("build step finished in 0.{k} s; module {m} compiled with 0 warnings; cache hit for {n} "
              "objects; linked target lib{m}.so; tests collected {n} passed {n} skipped 0; ")
TASKS = ("Build the project step by step and report problems.",
         "Review the test suite module by module and report flaky tests.")
RULES = (" Repository rules: keep functions short and named for what they do; every change comes with a test; "
         "never edit generated files under build/; run the linter before each commit; prefer the standard "
         "library; document public functions; report failures with the command that produced them; ask before "
         "deleting files; keep commits small with honest messages; the main branch must always build.")


def _tool_output(i: int) -> str:
    return " ".join(TOOL_WORDS.format(k=(i * 7 + j) % 10, m=f"m{i}_{j}", n=10 + i + j) for j in range(3))


def _tool(name: str, what: str) -> dict:
    return {"type": "function", "function": {
        "name": name, "description": f"{what} Returns plain text; fails with a message when the path is outside "
                                     "the workspace.",
        "parameters": {"type": "object", "properties": {"path": {"type": "string", "description": "A workspace path."},
                                                        "detail": {"type": "string", "description": "What to focus on."}},
                       "required": ["path"]}}}


TOOLS = [_tool("read_file", "Read a file of the workspace."), _tool("list_dir", "List a folder of the workspace."),
         _tool("run_tests", "Run the tests under a path."), _tool("search_code", "Search the code under a path."),
         _tool("git_diff", "Show the uncommitted changes under a path."),
         _tool("build", "Build the target at a path."), _tool("lint", "Lint the files under a path.")]


def agent_run(base: str, turns: int, budget_chars: int, max_tokens: int, client: str, explicit: bool,
              measure_from: int | None = None):
    """An agent chat under one client behaviour (CLIENTS), one turn per step: yields each turn's
    row. With `explicit`, the session is named and only the new turn is sent: the cost of reading
    the new turn alone, the floor. From turn `measure_from` on, each reply is also scored against
    a re-prefill of the session's tokens. In `shared` two agents alternate turns."""
    agents = 2 if client == "shared" else 1

    # A reply counts as its token budget in characters (4 a token), not as its text: the servers'
    # greedy replies may differ by a token, and counting their text made one client drop an
    # exchange a turn before another, so the servers were compared on prompts of other lengths.
    def size(m: dict) -> int:
        return 4 * max_tokens if m["role"] == "assistant" else len(m["content"])

    histories: list[list[dict]] = [[{"role": "user", "content": TASKS[a]}] for a in range(agents)]
    for i in range(turns):
        a, k = i % agents, i // agents  # whose turn, and its own turn number
        history = histories[a]
        headers = {"X-Kvside-Session": f"bench-explicit-{a}"} if explicit else None
        system = SYSTEM
        if client == "clock":
            system = f"{SYSTEM} Current time: 10:{i:02d}."
        elif client == "shared":
            system = SYSTEM + RULES
        tools = TOOLS[: 3 + k // 3] if client == "tools" else TOOLS if client == "shared" else None
        if client == "edit":
            history[0] = {"role": "user", "content": TASKS[0] + "".join(
                f" Also check module m{j}_0." for j in range(3, k + 1, 3))}
        tool = {"role": "tool", "content": _tool_output(i)}
        history.append(tool)
        if client == "placeholder":
            outputs = [j for j, m in enumerate(history) if m["role"] == "tool"]
            for j in outputs[:-2]:
                history[j] = {"role": "tool", "content": "[output elided]"}
        # the client's budget is for the whole prompt: what the tools and a longer system prompt take
        # leaves less for the history
        room = budget_chars - (len(json.dumps(tools)) + len(system) - len(SYSTEM) if tools else 0)
        dropped = 0
        while client != "placeholder" and sum(map(size, history)) > room and len(history) > 3:
            first = 0 if client in ("front", "clock", "regenerate") else 1  # the others keep their task message
            del history[first : first + 2]
            dropped += 1
        messages = [{"role": "system", "content": system}] + history
        first_turn = k == 0
        body = {"messages": messages if not explicit or first_turn else [tool], "max_tokens": max_tokens,
                "temperature": 0}
        if tools and (first_turn or not explicit):  # a named session keeps the tools it started with
            body["tools"], body["tool_choice"] = tools, "none"
        r = _stream(base, body, headers)
        if client == "regenerate" and not explicit:  # a named session is sent only what is new
            r = _stream(base, body, headers)
        history.append({"role": "assistant", "content": r["text"] or "ok"})
        row = {"turn": i, "ttft_s": r["ttft_s"], "cached_tokens": r["cached_tokens"],
               "prompt_tokens": r["prompt_tokens"], "dropped_exchanges": dropped,
               "server_prompt_ms": r["prompt_ms"]}  # the server's own time from reading to the first token
        if agents > 1:
            row["agent"] = a
        if measure_from is not None and i >= measure_from:
            row.update(_fidelity(base, r["session"]))
        yield row


def _load_request(base: str, body: dict, cut_after: int | None) -> dict:
    """One streamed request of the load run; with cut_after, the client goes away after that many
    content chunks. What came back: status, time to first token, whether the reply was complete."""
    t0 = time.perf_counter()
    out = {"status": 0, "ttft_s": None, "text": "", "finish": None, "done": False, "session": None, "cut": False}
    pieces: list[str] = []
    body = dict(body, stream=True)
    try:
        with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=600) as r:
            out["status"], out["session"] = r.status_code, r.headers.get("x-kvside-session")
            if r.status_code >= 400:
                r.read()
                return out
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    out["done"] = True
                    continue
                if not line.startswith("data: "):
                    continue
                chunk = json.loads(line[6:])
                for choice in chunk.get("choices", []):
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        if out["ttft_s"] is None:
                            out["ttft_s"] = time.perf_counter() - t0
                        pieces.append(piece)
                    out["finish"] = choice.get("finish_reason") or out["finish"]
                if cut_after is not None and len(pieces) >= cut_after:
                    out["cut"] = True
                    break  # leaving the with block closes the connection: the client went away
    except httpx.HTTPError as exc:
        out["error"] = repr(exc)
    out["text"] = "".join(pieces)
    return out


def load_run(base: str, clients: int, requests: int, max_tokens: int, leak_check: bool) -> dict:
    """`clients` concurrent streaming clients, each a conversation of `requests` turns sent as full
    message arrays; a quarter of the clients go away after three chunks of every reply. Counted:
    5xx answers, replies that did not end properly, and (kvside) sessions holding another
    client's turns."""
    results: list[dict] = []
    last_session: dict[int, str] = {}
    lock = threading.Lock()

    def client(c: int) -> None:
        history = [{"role": "system", "content": SYSTEM}]
        leaves = c % 4 == 0
        for k in range(requests):
            user = {"role": "user", "content": f"[client {c}] " + QUESTIONS[(c * requests + k) % len(QUESTIONS)]}
            r = _load_request(base, {"messages": history + [user], "max_tokens": max_tokens, "temperature": 0},
                              3 if leaves else None)
            with lock:
                results.append(r)
            if not leaves and r["done"]:
                history += [user, {"role": "assistant", "content": r["text"]}]
                if r["session"]:
                    last_session[c] = r["session"]

    wall = _concurrently(clients, client)
    ttfts = sorted(r["ttft_s"] for r in results if r["ttft_s"] is not None)
    whole = [r for r in results if not r["cut"]]
    out = {"clients": clients, "requests": len(results), "leaving_clients": (clients + 3) // 4,
           "status_5xx": sum(1 for r in results if r["status"] >= 500),
           "other_errors": sum(1 for r in results if r["status"] == 0 or 400 <= r["status"] < 500),
           "incomplete_replies": sum(1 for r in whole if not (r["done"] and r["finish"])),
           "ttft_p50_s": round(statistics.median(ttfts), 3) if ttfts else None,
           "ttft_p95_s": round(ttfts[int(0.95 * (len(ttfts) - 1))], 3) if ttfts else None,
           "wall_s": round(wall, 2), "error_samples": [r.get("error") for r in results if r.get("error")][:3]}
    if leak_check:
        leaks = 0
        for c, name in last_session.items():
            shown = httpx.get(f"{base}/kvside/sessions/{name}", timeout=120).json()
            for m in shown.get("messages", []):
                if m["role"] == "user" and m["state"] == "live" and not m["content"].startswith(f"[client {c}] "):
                    leaks += 1
        out["cross_session_leaks"] = leaks
        out["sessions_checked"] = len(last_session)
    return out


def turn_order(n: int, turn: int) -> list[int]:
    """The order n servers take their turns in on turn `turn`: the rows of a balanced Latin square
    (Williams' design), so that over n turns (2n for odd n) each server goes first as often as the
    others and follows each other server equally often. What ran just before a turn can change it
    on a 2-core machine (a long re-prefill warms it); with plain rotation each server followed
    the same one in three turns of four."""
    first = [0]
    for k in range(1, n):  # 0, 1, n-1, 2, n-2, ...: every difference between neighbours once
        first.append((k + 1) // 2 if k % 2 else n - k // 2)
    rows = [[(x + r) % n for x in first] for r in range(n)]
    if n % 2:  # odd n needs the reversed rows too
        rows += [row[::-1] for row in rows]
    return rows[turn % len(rows)]


def paired_difference(ours: list[dict], theirs: list[dict], late_from: int) -> dict:
    """kvside's late turns against another server's, turn by turn where both read prompts of the
    same length: the median of the differences in time to first token (negative: kvside first).
    The two medians of a column each can differ by more than the servers do: turns alternate
    between slow and quick for every server alike (how much was new, the machine's drift)."""
    diffs = sorted(a["ttft_s"] - b["ttft_s"] for a, b in zip(ours, theirs)
                   if a["turn"] >= late_from and a["prompt_tokens"] == b["prompt_tokens"])
    if not diffs:
        return {"turns": 0}
    return {"turns": len(diffs), "ttft_diff_median_s": round(statistics.median(diffs), 4),
            "kvside_first": sum(1 for d in diffs if d < 0)}


def run(model: str | None, n_ctx: int, turns: int, budget_chars: int, max_tokens: int, threads: int,
        late_from: int, load_clients: int, load_requests: int, client: str | None = None,
        fidelity: bool = True) -> dict:
    path = resolve(model).path
    configs = ["kvside", "kvside-noreuse", "kvside-explicit"] + (["llama-server"] if PEER.exists() else [])
    result: dict = {"model": str(path.name), "n_ctx": n_ctx, "turns": turns, "budget_chars": budget_chars,
                    "max_tokens": max_tokens, "threads": threads, "late_from": late_from, "runs": {}}
    if client is not None:
        result["client"] = client
        result["client_behaviour"] = CLIENTS[client]
    if not PEER.exists():
        result["notice"] = "llama-server not built (make peer): skipped"
    # All servers run at once and take turns, one chat turn each: a 2-core machine's speed drifts
    # over minutes, and running the configurations one after the other compared them at different
    # speeds. Each server is idle while another works.
    servers: dict[str, tuple] = {}
    try:
        for kind in configs if turns else []:  # --turns 0: the load run alone
            home = tempfile.mkdtemp(prefix="kvside-bench-serve-")
            # `shared`: a session (a slot) for each of the two agents
            servers[kind] = _start("llama-server" if kind == "llama-server" else
                                   ("kvside-noreuse" if kind == "kvside-noreuse" else "kvside"), path, n_ctx, threads, home,
                                   sessions=2 if client == "shared" else 1)
        traces = {}
        for kind, (_, base) in servers.items():
            explicit = kind == "kvside-explicit"
            if client is None:
                traces[kind] = chat_run(base, turns, budget_chars, max_tokens, explicit)
            else:
                measured = fidelity and kind in ("kvside", "kvside-explicit")
                traces[kind] = agent_run(base, turns, budget_chars, max_tokens, client, explicit,
                                         measure_from=late_from if measured else None)
        rows: dict[str, list[dict]] = {kind: [] for kind in traces}
        kinds = list(traces)
        for turn in range(turns):
            for i in turn_order(len(kinds), turn):
                rows[kinds[i]].append(next(traces[kinds[i]]))
    finally:
        for proc, _ in servers.values():
            _stop(proc)
    for kind, kind_rows in rows.items() if turns else []:
        late = [r["ttft_s"] for r in kind_rows if r["turn"] >= late_from]
        late_rows = [r for r in kind_rows if r["turn"] >= late_from]
        result["runs"][kind] = {"turns": kind_rows, "late_ttft_median_s": statistics.median(late),
                                "late_cached_median": statistics.median(r["cached_tokens"] for r in late_rows),
                                "late_prompt_median": statistics.median(r["prompt_tokens"] for r in late_rows)}
        scored = [r for r in late_rows if "kl" in r]
        if scored:
            result["runs"][kind]["late_kl_mean"] = statistics.fmean(r["kl"] for r in scored)
            result["runs"][kind]["late_top1_mean"] = statistics.fmean(r["top1"] for r in scored)
    if turns and "kvside" in result["runs"]:
        for kind in result["runs"]:
            if kind != "kvside":
                result["runs"][kind]["late_paired"] = paired_difference(rows["kvside"], rows[kind], late_from)
    if load_clients:  # a daemon with room for four sessions, beside llama-server with four slots
        result["load"] = {}
        for kind in ["kvside"] + (["llama-server"] if PEER.exists() else []):
            proc, base = _start(kind, path, n_ctx, threads, tempfile.mkdtemp(prefix="kvside-bench-load-"), sessions=4)
            try:
                result["load"][kind] = load_run(base, load_clients, load_requests, max_tokens, kind == "kvside")
            finally:
                _stop(proc)
    return result


def table(result: dict) -> str:
    runs = result["runs"]
    kinds = list(runs)
    lines = [f"serve: {result['turns']} turns, model {result['model']}, n_ctx {result['n_ctx']}; "
             f"TTFT s / cached tokens per turn"]
    if "client" in result:
        lines[0] += f"; client {result['client']}: {result['client_behaviour']}"
    lines.append("turn | " + " | ".join(kinds))
    for i in range(result["turns"]):
        cells = [f"{runs[k]['turns'][i]['ttft_s']:.3f} / {runs[k]['turns'][i]['cached_tokens']}" for k in kinds]
        lines.append(f"{i} | " + " | ".join(cells))
    if kinds:
        lines.append(f"late median (turn >= {result['late_from']}) | " +
                     " | ".join(f"{runs[k]['late_ttft_median_s']:.3f} / {runs[k]['late_cached_median']:.0f} of "
                                f"{runs[k]['late_prompt_median']:.0f}" for k in kinds))
    if any(runs[k].get("late_paired", {}).get("turns") for k in kinds):
        lines.append("late turns of the same prompt length: kvside's TTFT minus this one's, median "
                     "(kvside first in n of m) | " + " | ".join(
                         f"{p['ttft_diff_median_s']:+.3f} s ({p['kvside_first']} of {p['turns']})"
                         if (p := runs[k].get("late_paired", {})).get("turns") else "-" for k in kinds))
    if any("late_kl_mean" in runs[k] for k in kinds):
        lines.append(f"late kl / top1 against a re-prefill ({FIDELITY_TOKENS} reply tokens) | " +
                     " | ".join(f"{runs[k]['late_kl_mean']:.2e} / {runs[k]['late_top1_mean']:.3f}"
                                if "late_kl_mean" in runs[k] else "-" for k in kinds))
    for kind, load in result.get("load", {}).items():
        lines.append(f"load, {kind}: " + json.dumps({k: v for k, v in load.items() if k != "error_samples"}))
    if "notice" in result:
        lines.append(result["notice"])
    return "\n".join(lines)
