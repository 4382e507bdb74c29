"""The `kvside` command: a thin layer over the library. Every failure is one line on stderr and a
non-zero exit; set KVSIDE_DEBUG=1 to see tracebacks."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import kvside  # noqa: F401  (loads llama.cpp before numpy)
from kvside.errors import KvsideError

EXIT_ERROR = 1
EXIT_USAGE = 2
CHAT_N_CTX = 2048


def _engine_args(p: argparse.ArgumentParser, n_ctx: int = 2048) -> None:
    p.add_argument("--model", "-m", default=None, help="model name or GGUF path (default: $KVSIDE_MODEL, else qwen2.5-coder-0.5b "
                        "when installed, else the embedded SmolLM2-135M; kvside models)")
    p.add_argument("--chat-template", default=None, metavar="NAME|FILE",
                   help="the chat template: chatml, llama3, gemma, mistral, phi3, or a Jinja file or "
                        "tokenizer_config.json (default: the GGUF's own, else its family's)")
    p.add_argument("--n-ctx", type=int, default=n_ctx, help="context window per session (tokens)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--n-gpu-layers", type=int, default=None,
                   help="layers on the GPU or the RPC servers (default: all on GPU builds and with --rpc)")
    p.add_argument("--rpc", default=None, metavar="HOST:PORT[,...]",
                   help="put layers on llama.cpp rpc-servers (make rpc-server; loopback only unless --rpc-allow-remote)")
    p.add_argument("--rpc-allow-remote", action="store_true",
                   help="allow rpc-servers on other hosts: llama.cpp's RPC has no authentication or encryption, "
                        "so only on a network you trust (docs/scale-out.md)")
    p.add_argument("--tensor-split", type=_tensor_split, default=None, metavar="A,B,...",
                   help="each offload device's share of the layers, RPC servers first (e.g. 1,1)")
    p.add_argument("--exact", action="store_true",
                   help="attention kernels whose results do not depend on cell layout: bit-exact restores "
                        "of edited sessions, slower prefill (flash attention off)")
    p.add_argument("--prune-tools", type=_prune_spec, default=None, metavar="keep_last=N",
                   help="agents: when the window fills, mask old tool results (keeping the last N) before "
                        "rolling whole turns away")
    p.add_argument("--checkpoints", type=int, default=8, metavar="N",
                   help="models whose cache cannot go back (recurrent, sliding window): context checkpoints kept "
                        "per session at message boundaries, so an edit reads from the nearest (0: none)")
    p.add_argument("--swa-cache", choices=["full", "window"], default="full",
                   help="sliding-window models (Gemma 3, gpt-oss): the windowed layers' cache at full size (every "
                        "edit can shift cells) or at the window's size (far less memory; rolls read again)")


def _prune_spec(text: str) -> int:
    """`keep_last=N` or `N`."""
    value = text.split("=", 1)[1] if text.startswith("keep_last=") else text
    if not value.isdigit():
        raise argparse.ArgumentTypeError("expected keep_last=N with N >= 0")
    return int(value)


def _api_key_arg(p: argparse.ArgumentParser, serving: bool = False) -> None:
    p.add_argument("--api-key", default=os.environ.get("KVSIDE_API_KEY"),
                   help="the key clients must send (default: $KVSIDE_API_KEY)" if serving else
                   "the daemon's API key (default: $KVSIDE_API_KEY)")


def _daemon_args(p: argparse.ArgumentParser) -> None:
    """How the session commands reach a running daemon."""
    p.add_argument("--connect", default=None, metavar="URL", help="the daemon to use (default: $KVSIDE_URL, or one on 127.0.0.1:8077)")
    p.add_argument("--offline", action="store_true", help="work on the session files even when a daemon runs")
    _api_key_arg(p)


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", "-t", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repeat-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-tokens", "-n", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _memory_row(info: dict) -> str:
    """What the model's cache allows, for doctor."""
    if not (info["recurrent"] or info["sliding_window"]):
        return "plain attention: every edit in place"
    kind = ("recurrent state" if info["recurrent"] else
            f"sliding window of {info['sliding_window']} on some layers"
            + ("" if info["swa_full"] else " (cache at the window's size: no shifts)"))
    n = info["checkpoints"]
    back = (f"edits that go back read from the nearest of {n} context checkpoints per session, else from the start"
            if n else "edits that go back read the session again (--checkpoints 0)")
    return f"{kind}: {back}"


def _sampling(ns: argparse.Namespace) -> dict:
    keys = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "seed", "max_tokens", "stop")
    return {k: getattr(ns, k) for k in keys if getattr(ns, k, None) is not None}


def _tensor_split(text: str) -> list[float]:
    try:
        shares = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of numbers like 1,1") from None
    if not shares or any(x < 0 for x in shares) or sum(shares) <= 0:
        raise argparse.ArgumentTypeError("shares are 0 or more, and not all 0")
    return shares


def _engine(ns: argparse.Namespace, max_sessions: int = 2, persist: bool = False):
    from kvside.engine import Engine

    return Engine(
        model=ns.model, chat_template=getattr(ns, "chat_template", None), n_ctx=ns.n_ctx, max_sessions=max_sessions, n_threads=ns.threads,
        n_gpu_layers=ns.n_gpu_layers, persist=persist, sessions_dir=getattr(ns, "sessions_dir", None),
        exact=bool(getattr(ns, "exact", False)), prune_tools=getattr(ns, "prune_tools", None),
        reuse_chunk=getattr(ns, "reuse_chunk", 64), reuse_repair=getattr(ns, "reuse_repair", 16), embedding_model=getattr(ns, "embedding_model", None),
        checkpoints=getattr(ns, "checkpoints", 8), swa_full=getattr(ns, "swa_cache", "full") == "full",
        shared_sessions=bool(getattr(ns, "shared_sessions", False)), lease_ttl_s=getattr(ns, "lease_ttl", 15.0),
        rpc_servers=ns.rpc.split(",") if getattr(ns, "rpc", None) else None,
        rpc_allow_remote=bool(getattr(ns, "rpc_allow_remote", False)), tensor_split=getattr(ns, "tensor_split", None),
    ).start()


def _open_session(engine, name: str | None, system: str | None) -> str:
    """A saved session by name (restored exactly), a new one under that name, or a throwaway."""
    if name and any(row["name"] == name for row in engine.sessions()):
        return name
    return engine.new_session(name, system=system)


# -- commands -------------------------------------------------------------------------------------
def cmd_ask(ns: argparse.Namespace) -> int:
    prompt = " ".join(ns.prompt) if ns.prompt else ""
    if prompt == "-":
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise KvsideError_usage("the prompt is empty")
    with _engine(ns, persist=bool(ns.session)) as engine:
        name = _open_session(engine, ns.session, ns.system)
        stream = engine.chat(name, prompt, **_sampling(ns))
        try:
            for text in stream:
                sys.stdout.write(text)
                sys.stdout.flush()
        except KeyboardInterrupt:
            stream.cancel()
            stream.wait()
            print()
            return 130
        print()
        if ns.verbose:
            done = stream.completion
            print(
                f"[{done.usage.completion_tokens} tokens, prefill {done.t_prefill_s:.2f} s, "
                f"{done.decode_tok_s:.1f} tok/s, {done.finish_reason}]",
                file=sys.stderr,
            )
    return 0


def cmd_doctor(ns: argparse.Namespace) -> int:
    with _engine(ns, max_sessions=1) as engine:
        info = engine.info()
    if ns.json:
        print(json.dumps(info, indent=2))
        return 0
    model = info["model"]
    rows = [
        ("backend", info["backend"]),
        ("n_gpu_layers", info["n_gpu_layers"]),
        ("llama-cpp-python", info["llama_cpp_python"]),
        ("libllama", info["library"]),
        ("chosen", info["library_choice"]),
        ("native patch", "loaded: values:R, values:all, select:F available; CPU attention skips other sessions' "
         "cells" if info["native_patch"] else "not loaded (stock llama.cpp): values:R, values:all, select:F need it, "
         "and CPU attention slows beside other sessions' cells (make native)"),
        ("attention", info["attention"]),
        ("model", f"{info['model_name']} ({model['description']})"),
        ("path", model["path"]),
        ("fingerprint", model["fingerprint"][:16]),
        ("architecture", model["architecture"]),
        ("n_ctx_train", model["n_ctx_train"]),
        ("chat template", f"{info['chat_template']['name']}: {info['chat_template']['why']}"),
        ("rope type", model["rope_type"]),
        ("can_shift", info["can_shift"]),
        ("memory", _memory_row(info)),
        ("n_ctx / cells", f"{info['n_ctx']} per session, {info['n_cells']} cells"),
        ("threads", info["n_threads"]),
        *_device_rows(info),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def _device_rows(info: dict) -> list[tuple[str, str]]:
    """Which device holds which layers (llama.cpp's own report of the load), RPC servers named."""
    layers = info.get("layers") or {}
    rows = []
    for device, held in layers.items():
        rpc = next((d for d in info.get("rpc_devices", []) if d["name"] == device), None)
        where = f" at {rpc['description']}" if rpc else ""
        rows.append((f"layers on {device}", f"{_spans(held)}{where}"))
    return rows


def _spans(numbers: list[int]) -> str:
    out, start = [], None
    for i, n in enumerate(numbers):
        if start is None:
            start = n
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            out.append(f"{start}" if start == n else f"{start}-{n}")
            start = None
    return ", ".join(out) + f" ({len(numbers)})"


def cmd_proxy_config(ns: argparse.Namespace) -> int:
    from kvside.proxy import haproxy_config

    try:
        print(haproxy_config(ns.listen, ns.daemon, check_interval=ns.check_interval), end="")
    except ValueError as exc:
        raise KvsideError_usage(str(exc)) from None
    return 0


def cmd_models(ns: argparse.Namespace) -> int:
    from kvside.models import available, default_choice, resolve

    refs = available()
    chosen, why = default_choice()
    try:
        default_path = resolve(None).path
    except KvsideError:
        default_path = None
    if ns.json:
        print(json.dumps([{"name": r.name, "path": str(r.path), "size": r.size, "source": r.source,
                           "default": r.path == default_path} for r in refs], indent=2))
        return 0
    if not refs:
        print("no models found; put GGUF files in $KVSIDE_HOME/models, kvside pull OWNER/REPO, or pass --model PATH")
        return 0
    width = max(32, *(len(r.name) + 2 for r in refs))
    for r in refs:
        mark = "*" if r.path == default_path else " "
        print(f"{mark} {r.name:<{width}} {r.size / 1e6:8.1f} MB  {r.source:<8}  {r.path}")
    print(f"\n* default: {chosen} ({why})" if default_path else f"\ndefault {chosen!r} is not installed ({why})")
    return 0


def cmd_pull(ns: argparse.Namespace) -> int:
    from kvside.models import hub, install

    if ns.name is None:
        for m in install.CATALOG.values():
            state = "installed" if install.installed(m.name) else "not installed"
            print(f"{m.name:<24} {m.size / 1e6:6.0f} MB  {state:<13}  {m.description}")
        print("\nand any GGUF repository on the hub: kvside pull OWNER/REPO[:QUANT][@REVISION]")
        return 0
    log = lambda line: print(line, file=sys.stderr)  # noqa: E731
    if ns.name in install.CATALOG:
        install.install(ns.name, log=log)
    else:
        name, _ = hub.pull(ns.name, log=log)
        print(name)
    return 0


def cmd_rm(ns: argparse.Namespace) -> int:
    from kvside.models import hub, install, resolve

    if ns.name in install.CATALOG:
        if not install.remove(ns.name):
            raise KvsideError(f"{ns.name} is not installed")
        print(f"removed {ns.name}", file=sys.stderr)
        return 0
    removed = hub.remove(ns.name)
    if removed is not None:
        print(f"removed {removed} and its files in the hub's cache", file=sys.stderr)
        return 0
    ref = resolve(ns.name)  # not found: says so, with the names there are
    raise KvsideError(f"{ref.name} is not a pulled model ({ref.source}: {ref.path}); delete the file yourself "
                      "if you mean to")


def cmd_chat(ns: argparse.Namespace) -> int:
    if ns.plain:
        from kvside.termchat import run_terminal_chat

        with _engine(ns, persist=bool(ns.session)) as engine:
            name = _open_session(engine, ns.session, ns.system)
            return run_terminal_chat(engine, name, params=_sampling(ns))
    app, close = chat_app(ns)
    try:
        app.run()
    finally:
        for failure in close():
            print(f"kvside: {failure}", file=sys.stderr)
    return 0


def chat_app(ns: argparse.Namespace):
    """The chat app as `kvside chat` sets it up from its flags, and a function that closes what
    the app started (returning the sessions that could not be saved)."""
    import asyncio

    from kvside.tui.app import ChatApp
    from kvside.tui.backend import LocalBackend, RemoteBackend

    if ns.connect:  # the daemon has its own model, window and folders: these flags would do nothing
        local_only = [flag for flag, given in (
            ("--model", ns.model), ("--docs", ns.docs), ("--sessions-dir", ns.sessions_dir), ("--exact", ns.exact),
            ("--threads", ns.threads), ("--n-gpu-layers", ns.n_gpu_layers), ("--n-ctx", ns.n_ctx != CHAT_N_CTX),
            ("--prune-tools", ns.prune_tools is not None), ("--rpc", ns.rpc), ("--tensor-split", ns.tensor_split)) if given]
        if local_only:
            raise KvsideError_usage(f"{', '.join(local_only)} set up the in-process engine; with --connect the "
                                    "daemon's own settings apply (give them to `kvside serve`)")
    engines, watchers = [], []
    params = _sampling(ns)

    async def local():
        engine = await asyncio.to_thread(_engine, ns, 4, True)
        engines.append(engine)
        watchers.append(_watch_docs(engine, ns.docs))
        return LocalBackend(engine, params)

    async def remote():
        backend = RemoteBackend(ns.connect, ns.api_key, params)
        try:
            await backend.connect()
        except Exception as exc:  # shown in the app as one line
            raise KvsideError(f"cannot reach {ns.connect}: {exc}") from None
        return backend

    def close() -> list[str]:
        for w in watchers:
            if w:
                w.stop()
        failures = []
        for engine in engines:
            engine.close()
            failures += engine.close_failures
        return failures

    return ChatApp(remote if ns.connect else local, system=ns.system, session=ns.session), close


def cmd_bench(ns: argparse.Namespace) -> int:
    from kvside.bench import print_report
    from kvside.engine.edits import Strategy

    if ns.what == "decode":
        from kvside.bench.decode import run

        result = run(ns.model, ns.tokens, ns.reps, ns.n_ctx, ns.threads)
        keys = ["model", "n_prompt", "n_tokens", "kvside_tok_s", "llama_cpp_python_tok_s", "ratio", "prefill_tok_s"]
        print_report(result, ns.json, [(k, result[k]) for k in keys])
        return 0
    if ns.what == "restore":
        from kvside.bench import restore

        flash = {"auto": None, "on": True, "off": False, "reference": None}[ns.flash_attn]
        result = restore.run(ns.model, ns.ctx, ns.reps, ns.threads, flash, exact=ns.exact,
                             reference_kernels=ns.flash_attn == "reference")
        print_report(result, ns.json)
        return 0
    if ns.what == "serve":
        from kvside.bench import serve

        result = serve.run(ns.model, ns.n_ctx, ns.turns, ns.budget_chars, ns.max_tokens, ns.threads or os.cpu_count() or 2,
                           ns.late_from, ns.load_clients, ns.load_requests, ns.client, fidelity=not ns.no_fidelity)
        print(json.dumps(result, indent=2) if ns.json else serve.table(result))
        return 0
    if ns.what == "compose":
        from kvside.bench import compose as bench_compose

        for s in ns.strategy or []:
            Strategy.parse(s)  # a bad name fails before any work
        choices = (ns.recompute or []) + (ns.strategy or []) or bench_compose.default_strategies()
        result = bench_compose.run(ns.model, [1, 3, 8], choices, ns.steps, ns.threads)
        print(json.dumps(result, indent=2) if ns.json else bench_compose.table(result))
        return 0
    if ns.what == "select":
        from kvside.bench import selection

        counts = ns.documents or [3, 8]
        budgets = ns.budget or [0.15, 0.3]
        if any(n < 1 for n in counts) or any(not 0 < b <= 1 for b in budgets):
            raise KvsideError_usage("--documents must be >= 1 and --budget between 0 (excluded) and 1")
        unknown = set(ns.signal or []) - set(selection.SIGNALS)
        if unknown:
            raise KvsideError_usage(f"unknown --signal {', '.join(sorted(unknown))} (one of {', '.join(selection.SIGNALS)})")
        result = selection.run(ns.model, counts, ns.signal or list(selection.SIGNALS), budgets, ns.steps, ns.threads)
        print(json.dumps(result, indent=2) if ns.json else selection.table(result))
        return 0
    if ns.what == "interference":
        from kvside.bench import interference

        if ns.doc_kb < 1 or ns.reprefill_tokens < 2 or ns.reprefill_tokens >= ns.n_ctx:
            raise KvsideError_usage("--doc-kb must be >= 1 and --reprefill-tokens between 2 and --n-ctx - 1")
        result = interference.run(ns.model, ns.doc_kb, ns.reprefill_tokens, ns.n_ctx, ns.threads)
        print(json.dumps(result, indent=2) if ns.json else interference.table(result))
        return 0
    if ns.what == "latency":
        from kvside.bench import latency

        if ns.requests < 2 or ns.load_clients < 1 or ns.decode_reps < 1:
            raise KvsideError_usage("--requests must be at least 2, --load-clients and --decode-reps at least 1")
        idle_tokens = ns.idle_tokens if ns.idle_tokens is not None else ns.n_ctx * 3 // 4
        if ns.idle_sessions < 0 or ns.idle_sessions >= ns.load_clients:
            raise KvsideError_usage("--idle-sessions must be 0 or more and below --load-clients (the sessions "
                                    "each server holds), so the measured stream has one of its own")
        if ns.idle_sessions and not 16 <= idle_tokens <= ns.n_ctx - ns.tokens - 64:
            raise KvsideError_usage(f"--idle-tokens must be between 16 and --n-ctx - --tokens - 64 "
                                    f"({ns.n_ctx - ns.tokens - 64})")
        if not 16 <= ns.prompt_tokens <= ns.n_ctx - 64:
            raise KvsideError_usage(f"--prompt-tokens must be between 16 and --n-ctx - 64 ({ns.n_ctx - 64})")
        idle = (ns.idle_sessions, idle_tokens)
        if ns.url:
            result = latency.against(ns.url.rstrip("/"), ns.requests, ns.load_clients, ns.max_tokens, ns.tokens,
                                     ns.decode_reps, ns.prompt_tokens, idle=idle)
        else:
            result = latency.run(ns.model, ns.n_ctx, ns.threads or os.cpu_count() or 2, ns.requests, ns.load_clients,
                                 ns.max_tokens, decode_tokens=ns.tokens, decode_reps=ns.decode_reps,
                                 prompt_tokens=ns.prompt_tokens, idle=idle)
        print(json.dumps(result, indent=2) if ns.json else latency.table(result))
        return 0
    if ns.what == "fim":
        from kvside.bench import fim

        if ns.requests < 2:
            raise KvsideError_usage("--requests must be at least 2")
        result = fim.run(ns.model, ns.n_ctx, ns.requests, ns.threads or os.cpu_count() or 2)
        print(json.dumps(result, indent=2) if ns.json else fim.table(result))
        return 0
    if ns.what == "agent":
        from kvside.bench import agent

        if ns.rounds < 1 or ns.tool_tokens < 16 or ns.keep_tools < 0 or ns.recall_last < 1:
            raise KvsideError_usage("--rounds and --recall-last must be >= 1, --tool-tokens >= 16, --keep-tools >= 0")
        if ns.tool_tokens * 2 >= ns.n_ctx:
            raise KvsideError_usage("--tool-tokens must be under half of --n-ctx")
        result = agent.run(ns.model, ns.rounds, ns.tool_tokens, ns.n_ctx, ns.keep_tools, ns.recall_last, ns.threads)
        print(json.dumps(result, indent=2) if ns.json else agent.table(result))
        return 0
    if ns.what == "costs":
        from kvside.bench import costs

        depths = [d for d in (0, 512, 1024, 2048, 4096) if d + 512 < ns.n_ctx]
        if ns.reps < 1:
            raise KvsideError_usage("--reps must be at least 1")
        flash = {"auto": None, "on": True, "off": False}.get(ns.flash_attn)
        if flash is None and ns.flash_attn == "reference":
            raise KvsideError_usage("costs: --flash-attn is auto, on or off")
        result = costs.run(ns.model, ns.n_ctx, depths, ns.reps, ns.threads, flash_attn=flash)
        print(json.dumps(result, indent=2) if ns.json else costs.table(result))
        return 0
    if ns.what == "roll":
        from kvside.bench import roll

        strategies = ns.strategy or roll.default_strategies()
        for s in strategies:
            Strategy.parse(s)  # a bad name fails before any work
        if ns.drop < 1 or ns.drop >= ns.ctx - ns.keep:
            raise KvsideError_usage("--drop must be between 1 and ctx - keep - 1")
        result = roll.run(ns.model, ns.ctx, ns.drop, ns.keep, strategies, ns.steps, ns.threads)
        print(json.dumps(result, indent=2) if ns.json else roll.table(result))
        return 0
    if ns.what == "fleet":
        from kvside.bench import fleet

        if ns.ctx < 64 or ns.reps < 1 or ns.sessions < 1:
            raise KvsideError_usage("--ctx must be >= 64, --reps and --sessions >= 1")
        result = fleet.run(ns.model, ns.ctx // 3, ns.reps, ns.threads or 1, ns.sessions)
        print(json.dumps(result, indent=2) if ns.json else fleet.table(result))
        return 0
    if ns.what == "rpc":
        from kvside.bench import rpc as bench_rpc
        from kvside.engine.rpc import parse_servers

        if ns.ctx < 64 or ns.drop >= ns.ctx - 4 or ns.tokens < 1 or ns.reps < 1:
            raise KvsideError_usage("--ctx must be >= 64, --drop under ctx - 4, --tokens and --reps >= 1")
        servers = parse_servers(ns.rpc, ns.rpc_allow_remote) if ns.rpc else None
        result = bench_rpc.run(ns.model, servers, ns.n_gpu_layers, ns.ctx, ns.tokens, ns.drop, ns.reps, ns.threads)
        print(json.dumps(result, indent=2) if ns.json else bench_rpc.table(result))
        return 0
    raise KvsideError_usage(f"unknown benchmark {ns.what!r}")


def cmd_serve(ns: argparse.Namespace) -> int:
    from pathlib import Path

    import uvicorn

    from kvside.server.app import Daemon
    from kvside.server.pool import ModelPool, parse_size

    if ns.host not in ("127.0.0.1", "localhost", "::1") and not ns.api_key:
        print("kvside: warning: listening beyond loopback without --api-key (see docs/security.md)", file=sys.stderr)
    if ns.max_upload < 1:
        raise KvsideError_usage("--max-upload must be at least 1 MB")
    if ns.reuse_chunk < 0 or ns.reuse_repair < 0:
        raise KvsideError_usage("--reuse-chunk and --reuse-repair must be 0 or more tokens")
    if ns.max_models < 1:
        raise KvsideError_usage("--max-models must be at least 1")
    if ns.lease_ttl < 1 or ns.drain_timeout < 0:
        raise KvsideError_usage("--lease-ttl must be at least 1 s and --drain-timeout 0 s or more")
    budget = None
    if ns.memory_budget:
        try:
            budget = parse_size(ns.memory_budget)
        except ValueError as exc:
            raise KvsideError_usage(f"--memory-budget: {exc}") from None
    engine = _engine(ns, max_sessions=ns.max_sessions, persist=True)
    watcher = pool = None
    try:
        watcher = _watch_docs(engine, ns.docs)
        folder = Path(engine.call(lambda core: core.sessions_dir))

        def other_model(name: str, sessions: Path):
            from kvside.engine import Engine

            return Engine(model=name, n_ctx=ns.n_ctx, max_sessions=ns.max_sessions, n_threads=ns.threads,
                          n_gpu_layers=ns.n_gpu_layers, persist=True, sessions_dir=str(sessions),
                          exact=bool(ns.exact), prune_tools=ns.prune_tools, reuse_chunk=ns.reuse_chunk,
                          reuse_repair=ns.reuse_repair, checkpoints=ns.checkpoints,
                          swa_full=ns.swa_cache == "full", shared_sessions=ns.shared_sessions,
                          lease_ttl_s=ns.lease_ttl, rpc_servers=ns.rpc.split(",") if ns.rpc else None,
                          rpc_allow_remote=ns.rpc_allow_remote, tensor_split=ns.tensor_split).start()

        pool = ModelPool(engine, make_engine=other_model if ns.max_models > 1 else None, max_models=ns.max_models,
                         memory_budget=budget, sessions_dir=folder).start()
        daemon = Daemon(engine, api_key=ns.api_key, host=ns.host, allow_hosts=tuple(ns.allow_host or ()),
                        allow_origins=tuple(ns.allow_origin or ()), max_upload=ns.max_upload << 20,
                        reuse=not ns.no_reuse, pool=pool)
        if ns.log_requests:
            from kvside.server import accesslog

            accesslog.switch_on()
        print(f"kvside serving {daemon.model_name} on http://{ns.host}:{ns.port}"
              + (f" (and up to {ns.max_models - 1} other installed models on demand)" if ns.max_models > 1 else ""),
              file=sys.stderr)
        # SIGTERM drains: the port closes (a proxy's health check sees the daemon go), replies in
        # flight get --drain-timeout to end, then closing the engine saves every session to the
        # sessions folder (and, shared, lets other daemons open them)
        # (uvicorn raises the signal again once it has stopped: the handler here takes it, so the
        # process lives on to save its sessions instead of dying of it)
        signal.signal(signal.SIGTERM, lambda signum, frame: None)
        uvicorn.run(daemon.app, host=ns.host, port=ns.port, log_level="warning",
                    timeout_graceful_shutdown=ns.drain_timeout)
    finally:
        if watcher:
            watcher.stop()
        if pool:
            pool.close()
        engine.close()
        for failure in engine.close_failures:
            print(f"kvside: {failure}", file=sys.stderr)
    return 0


def _watch_docs(engine, folder: str | None):
    """--docs DIR: compile the folder's documents and keep them compiled as they change."""
    if not folder:
        return None
    from pathlib import Path

    from kvside.docwatch import DocWatcher

    def report(path, result, error):
        if error is not None:
            print(f"kvside: docs: {path}: {error.message}", file=sys.stderr)

    return DocWatcher(engine, Path(folder), on_result=report).start()


def cmd_compile(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.progress import Progress

    from kvside.docwatch import documents_in

    paths: list[Path] = []
    for p in ns.paths:
        path = Path(p)
        if not path.exists():
            raise KvsideError_usage(f"no such file or folder: {p}")
        paths += documents_in(path) if path.is_dir() else [path]
    failed = 0
    with _engine(ns, max_sessions=1) as engine, Progress(transient=True) as progress:
        for path in paths:
            task = progress.add_task(path.name, total=None)
            try:
                r = engine.compile(str(path), progress=lambda i, n, t=task: progress.update(t, completed=i, total=n))
            except KvsideError as exc:
                failed += 1
                progress.console.print(f"skipped {path}: {exc.message}")
                continue
            finally:
                progress.remove_task(task)
            how = "unchanged" if r["reused"] else f"compiled in {r['t_compile_s']:.1f} s"
            progress.console.print(f"{path}: {r['tokens']} tokens, {r['blocks']} block(s), {how}")
    return 1 if failed and failed == len(paths) else 0


def cmd_docs(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from kvside.engine import compose

    if ns.action == "add":
        ns.paths = ns.paths or []
        if not ns.paths:
            raise KvsideError_usage("docs add needs a path")
        return cmd_compile(ns)
    if ns.action == "rm":
        if not ns.paths:
            raise KvsideError_usage("docs rm needs a path")
        for p in ns.paths:
            key, _ = compose.find(p)
            compose.forget_document(Path(key))
            print(f"removed {key}")
        return 0
    index = compose.load_index()
    if ns.json:
        print(json.dumps(index, indent=2))
        return 0
    if not index:
        print("no compiled documents (kvside compile PATH)")
    for key, e in sorted(index.items()):
        print(f"{e.get('name', key):<28} {e['tokens']:>7} tokens {len(e['blocks']):>3} block(s)  {key}")
    return 0


def cmd_eval(ns: argparse.Namespace) -> int:
    from kvside.bench import evaluate

    log = (lambda m: print(m, file=sys.stderr)) if ns.verbose else (lambda m: None)
    # one run compares models: each is evaluated in turn, one engine at a time
    models = [m.strip() for m in ns.model.split(",") if m.strip()] if ns.model else [None]
    results = []
    for model in models:
        result = evaluate.run(model, ns.quick, ns.threads, log, only=tuple(ns.only.split(",")) if ns.only else evaluate.SECTIONS)
        if ns.plot:
            result["figures"] = evaluate.plot(result, os.path.join(ns.plot, result["model"]) if len(models) > 1 else ns.plot)
        results.append(result)
    if ns.json:
        print(json.dumps(results[0] if len(results) == 1 else {"models": results}, indent=2))
    else:
        print("\n\n".join(evaluate.tables(r) for r in results))
        if len(results) > 1:
            print("\n" + evaluate.comparison(results))
    return 0


def _daemon(ns: argparse.Namespace):
    """The running daemon the session commands should use, or None (then they work on files)."""
    from kvside.remote import Daemon, find_daemon

    if getattr(ns, "offline", False):
        return None
    url = find_daemon(getattr(ns, "connect", None))
    return Daemon(url, getattr(ns, "api_key", None)) if url else None


def cmd_save(ns: argparse.Namespace) -> int:
    from kvside import sessions_cli as sc

    daemon = _daemon(ns)
    if daemon:
        out = daemon.save(ns.session, ns.file)
        print(f"saved {out['session']} to {out['path']} ({out['bytes'] / 1e6:.2f} MB) from the running daemon")
        return 0
    out = sc.export(ns.session, ns.file, sc.sessions_dir(ns.sessions_dir))
    print(f"saved {out['session']} to {out['file']} ({out['bytes'] / 1e6:.2f} MB)")
    return 0


def cmd_restore(ns: argparse.Namespace) -> int:
    from kvside import sessions_cli as sc

    daemon = _daemon(ns)
    if daemon:
        out = daemon.restore(ns.file, ns.as_name)
        print(f"restored {out['session']} into the running daemon")
        return 0
    out = sc.import_file(ns.file, ns.as_name, sc.sessions_dir(ns.sessions_dir), ns.model, ns.force)
    print(f"restored {out['session']} ({out['cells']} cells) into {out['file']}")
    return 0


def cmd_sessions(ns: argparse.Namespace) -> int:
    from kvside import sessions_cli as sc

    daemon = _daemon(ns)
    if daemon:
        if ns.action == "list":
            rows = daemon.sessions()
            if ns.json:
                print(json.dumps(rows, indent=2))
            for r in ([] if ns.json else rows):
                where = "resident" if r.get("resident") else "on disk"
                print(f"{r['name']:<24} {r.get('n_cells', '-'):>6} cells  {where}")
            return 0
        if not ns.name:
            raise KvsideError_usage(f"sessions {ns.action} needs a session name")
        data = daemon.remove(ns.name) if ns.action == "rm" else daemon.show(ns.name)
        print(json.dumps(data, indent=2) if ns.json or ns.action == "show" else f"removed {ns.name}")
        return 0
    folder = sc.sessions_dir(ns.sessions_dir)
    if ns.action == "list":
        sc.print_listing(sc.listing(folder), ns.json)
        return 0
    if not ns.name:
        raise KvsideError_usage(f"sessions {ns.action} needs a session name")
    path = sc.stored(ns.name, folder)
    if ns.action == "rm":
        path.unlink()
        print(f"removed {ns.name}")
        return 0
    return _print_info(sc.describe(path, ns.model), ns.json)


def cmd_inspect(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from kvside import sessions_cli as sc

    return _print_info(sc.describe(Path(ns.file), ns.model), ns.json)


def _print_info(info: dict, as_json: bool) -> int:
    if as_json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    return 0


class KvsideError_usage(KvsideError):  # noqa: N801  (a usage error: exit 2)
    pass


# -- parser ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvside", description="A local LLM runtime that edits its KV cache.")
    parser.add_argument("--version", action="version", version=f"kvside {kvside.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ask", help="one-shot answer, streamed")
    p.add_argument("prompt", nargs="*", help="the question ('-' reads standard input)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--session", default=None, help="continue (or start) a saved session by name")
    p.add_argument("--sessions-dir", default=None, help="where sessions are saved")
    p.add_argument("--verbose", "-v", action="store_true", help="print timing to stderr")
    _engine_args(p)
    _sampling_args(p)
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("chat", help="the chat app (Textual), or a plain terminal chat with --plain")
    p.add_argument("--system", default=None)
    p.add_argument("--plain", action="store_true", help="a plain line-by-line chat instead of the app")
    p.add_argument("--connect", default=None, metavar="URL", help="use a running `kvside serve` instead of an in-process engine")
    p.add_argument("--docs", default=None, metavar="DIR", help="compile and watch a folder of documents (/attach NAME)")
    _api_key_arg(p)
    p.add_argument("--session", default=None, help="continue (or start) a saved session by name")
    p.add_argument("--sessions-dir", default=None, help="where sessions are saved")
    _engine_args(p, n_ctx=CHAT_N_CTX)
    _sampling_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("doctor", help="what kvside runs on: backend, library, model, cache")
    p.add_argument("--json", action="store_true")
    _engine_args(p, n_ctx=512)
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("proxy-config", help="HAProxy's configuration for a fleet of daemons sharing a sessions "
                                            "folder (docs/scale-out.md)")
    p.add_argument("--listen", default="127.0.0.1:8077", metavar="HOST:PORT", help="where the proxy listens")
    p.add_argument("--daemon", action="append", required=True, metavar="HOST:PORT",
                   help="a `kvside serve --shared-sessions` daemon (repeatable)")
    p.add_argument("--check-interval", default="500ms", help="how often the proxy asks each daemon's /health")
    p.set_defaults(func=cmd_proxy_config)

    p = sub.add_parser("models", help="list the models kvside can name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("pull", help="download a model: OWNER/REPO[:QUANT] from the hub, or a packaged one "
                                    "(no name: list the packaged ones)")
    p.add_argument("name", nargs="?")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("rm", help="remove a pulled or packaged model")
    p.add_argument("name")
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser("serve", help="the OpenAI-compatible daemon")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8077)
    _api_key_arg(p, serving=True)
    p.add_argument("--allow-origin", action="append", default=None, metavar="ORIGIN",
                   help="a web page origin allowed to call the daemon, e.g. http://localhost:3000 (repeatable; "
                        "'*' allows every page); others are refused")
    p.add_argument("--allow-host", action="append", default=None, metavar="NAME",
                   help="a Host name clients may use besides loopback names and --host (repeatable)")
    p.add_argument("--max-upload", type=int, default=16384, metavar="MB",
                   help="largest session file a client may upload (PUT /kvside/sessions/NAME/file)")
    p.add_argument("--sessions", dest="sessions_dir", default=None, help="folder for saved sessions")
    p.add_argument("--max-sessions", type=int, default=4, help="sessions resident in the cache")
    p.add_argument("--shared-sessions", action="store_true",
                   help="the --sessions folder is shared with other daemons (a fleet behind a proxy, "
                        "docs/scale-out.md): a session is open on one daemon at a time, handed over on request, "
                        "saved after every reply")
    p.add_argument("--lease-ttl", type=float, default=15.0, metavar="S",
                   help="with --shared-sessions: a daemon on another host silent this long is taken for dead "
                        "and its sessions reopened elsewhere (one on this host: at once)")
    p.add_argument("--drain-timeout", type=float, default=30.0, metavar="S",
                   help="on SIGTERM, how long replies in flight may take before the sessions are saved")
    p.add_argument("--log-requests", action="store_true",
                   help="a line on stderr per request answered: status and time, and for a reply its session, "
                        "prompt tokens read and reused, tokens written and the cache edits made for it")
    p.add_argument("--max-models", type=int, default=2, metavar="N",
                   help="models loaded at once: requests may name any installed model, loaded on demand and "
                        "unloaded least recently used first (1: this model only)")
    p.add_argument("--memory-budget", default=None, metavar="SIZE",
                   help="most memory the loaded models may hold, weights and KV cache (e.g. 8G); idle models "
                        "unload to make room")
    p.add_argument("--no-reuse", action="store_true", help="a fresh session per request (for comparison)")
    p.add_argument("--embedding-model", default=None, metavar="GGUF",
                   help="an embedding model (name or path) for /v1/embeddings and /api/embed; without it the chat "
                        "model's hidden states are mean-pooled")
    p.add_argument("--reuse-repair", type=int, default=16, metavar="R",
                   help="text prompts: the first R tokens of each moved run are computed again after their new "
                        "context (fidelity for R tokens per run; 0: none)")
    p.add_argument("--reuse-chunk", type=int, default=64, metavar="N",
                   help="text prompts (autocomplete, /completion): runs of at least N tokens found again after a "
                        "change are moved into place instead of read again; 0 keeps the common prefix only")
    p.add_argument("--docs", default=None, metavar="DIR", help="compile and watch a folder of documents")
    _engine_args(p, n_ctx=4096)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("compile", help="precompute documents' KV blocks (files or folders)")
    p.add_argument("paths", nargs="+")
    _engine_args(p)
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("docs", help="list, add or remove compiled documents")
    p.add_argument("action", nargs="?", default="list", choices=["list", "add", "rm"])
    p.add_argument("paths", nargs="*")
    p.add_argument("--json", action="store_true")
    _engine_args(p)
    p.set_defaults(func=cmd_docs)

    p = sub.add_parser("eval", help="fidelity of every edit against a re-prefill, on any GGUF")
    p.add_argument("--model", "-m", default=None, help="a model, or several separated by commas to compare them")
    p.add_argument("--quick", action="store_true", help="a small grid (a few minutes on CPU)")
    p.add_argument("--only", default=None, metavar="SECTIONS",
                   help="comma-separated sections to run: noise, rolling, kv, compaction, composition")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", default=None, metavar="DIR", help="write PNG figures")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--verbose", "-v", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("save", help="export a saved session to a file")
    p.add_argument("session")
    p.add_argument("file", nargs="?", default=None)
    p.add_argument("--sessions-dir", default=None)
    _daemon_args(p)
    p.set_defaults(func=cmd_save)

    p = sub.add_parser("restore", help="import a session file (checked in full) into the sessions folder")
    p.add_argument("file")
    p.add_argument("--as", dest="as_name", default=None, help="name for the restored session")
    p.add_argument("--force", action="store_true", help="replace a session of that name")
    p.add_argument("--model", "-m", default=None, help="model the file must match (default: the default model)")
    p.add_argument("--sessions-dir", default=None)
    _daemon_args(p)
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("sessions", help="list, show or remove saved sessions")
    p.add_argument("action", nargs="?", default="list", choices=["list", "show", "rm"])
    p.add_argument("name", nargs="?", default=None)
    p.add_argument("--json", action="store_true")
    p.add_argument("--model", "-m", default=None)
    p.add_argument("--sessions-dir", default=None)
    _daemon_args(p)
    p.set_defaults(func=cmd_sessions)

    p = sub.add_parser("inspect", help="what a session file holds, whether it is intact and fits the model")
    p.add_argument("file")
    p.add_argument("--json", action="store_true")
    p.add_argument("--model", "-m", default=None)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("bench", help="benchmarks against their reference, printed as JSON or a table")
    p.add_argument("what", choices=["decode", "roll", "restore", "serve", "compose", "interference", "agent", "fim", "latency",
                                        "costs", "rpc", "fleet", "select"])
    p.add_argument("--requests", type=int, default=50, help="fim: autocomplete requests in the trace; latency: requests of the one-client round")
    p.add_argument("--rounds", type=int, default=12, help="agent: tool rounds")
    p.add_argument("--tool-tokens", type=int, default=300, help="agent: tokens per tool result")
    p.add_argument("--keep-tools", type=int, default=2, help="agent: tool results the prune policy keeps")
    p.add_argument("--recall-last", type=int, default=3, help="agent: recent tool results whose facts are asked for")
    p.add_argument("--doc-kb", type=int, default=100, help="interference: size of the document compiled")
    p.add_argument("--reprefill-tokens", type=int, default=2048, help="interference: tokens re-prefilled")
    p.add_argument("--recompute", type=int, action="append", default=None,
                   help="compose: tokens recomputed at the start of each block (repeatable; -1 = all)")
    p.add_argument("--signal", action="append", default=None,
                   help="select: how the cells to recompute are chosen (repeatable; default: all)")
    p.add_argument("--budget", type=float, action="append", default=None,
                   help="select: fraction of the documents' cells recomputed (repeatable; default 0.15 and 0.3)")
    p.add_argument("--documents", type=int, action="append", default=None,
                   help="select: documents attached (repeatable; default 3 and 8)")
    p.add_argument("--turns", type=int, default=20, help="serve: chat turns")
    p.add_argument("--budget-chars", type=int, default=2400, help="serve: history kept by the client, in characters")
    p.add_argument("--max-tokens", type=int, default=48, help="serve: tokens per reply")
    p.add_argument("--late-from", type=int, default=10, help="serve: first turn counted as late")
    p.add_argument("--load-clients", type=int, default=16, help="serve: concurrent clients in the load run")
    p.add_argument("--client", default=None, choices=["front", "cline", "placeholder", "clock", "edit", "tools", "shared", "regenerate"],
                   help="serve: an agent chat under this client behaviour (see kvside/bench/serve.py)")
    p.add_argument("--url", default=None, help="latency: measure a server already running there instead of "
                   "starting kvside and llama-server")
    p.add_argument("--no-fidelity", action="store_true",
                   help="serve --client: skip scoring late replies against a re-prefill (kl, top1)")
    p.add_argument("--load-requests", type=int, default=4, help="serve: requests per load client")
    p.add_argument("--flash-attn", choices=["auto", "on", "off", "reference"], default="auto",
                   help="restore, costs: attention kernel (reference: ggml's reference kernels, native patch; restore only)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--tokens", type=int, default=128, help="decode, latency: tokens to generate (latency: one stream's decode rate)")
    p.add_argument("--reps", type=int, default=3, help="decode, restore, costs, fleet, rpc: repetitions")
    p.add_argument("--decode-reps", type=int, default=5,
                   help="latency: reps of the single-stream decode, the servers taking turns")
    p.add_argument("--prompt-tokens", type=int, default=900,
                   help="latency: tokens of the new prompt whose reading time is measured")
    p.add_argument("--idle-sessions", type=int, default=3,
                   help="latency: then leave this many long sessions idle in each server and measure the decode and "
                        "the prompt again (0: skip)")
    p.add_argument("--idle-tokens", type=int, default=None,
                   help="latency: prompt tokens of each idle session (default: three quarters of --n-ctx)")
    p.add_argument("--ctx", type=int, default=1024, help="roll, restore, rpc, fleet: tokens in the cache (fleet: about)")
    p.add_argument("--sessions", type=int, default=4, help="fleet: sessions resident when the daemon is drained")
    p.add_argument("--drop", type=int, default=256, help="roll, rpc: tokens dropped")
    p.add_argument("--keep", type=int, default=4, help="roll: tokens kept at the front")
    p.add_argument("--strategy", action="append", default=None,
                   help="roll, compose: strategy (repeatable; default: all available)")
    p.add_argument("--steps", type=int, default=32, help="roll: teacher-forced steps")
    _engine_args(p, n_ctx=1024)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        return ns.func(ns)
    except KvsideError_usage as exc:
        print(f"kvside: error: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    except KvsideError as exc:
        print(f"kvside: error: {exc.message}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:  # the last resort: one line, no traceback unless asked
        if os.environ.get("KVSIDE_DEBUG"):
            raise
        print(f"kvside: internal error: {type(exc).__name__}: {exc} (KVSIDE_DEBUG=1 shows details)", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
