"""`kvside bench rpc`: the same model local and with its layers on rpc-servers, in one run: prefill
and decode rate, a roll (K shift where the cells are), a save and a restore (the state read back
from the servers and sent to them again). Without --rpc, two rpc-servers are started on loopback
from `make rpc-server`'s build, so the figures show what the protocol costs, not a network."""

from __future__ import annotations

import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from kvside.bench import corpus, median
from kvside.engine import Engine, edits, persist
from kvside.errors import KvsideError

ROOT = Path(__file__).resolve().parents[2]


def _rpc_server() -> Path:
    for path in sorted((ROOT / "build").glob("rpc-*/bin/ggml-rpc-server")):
        return path
    raise KvsideError("no rpc-server: build one with `make rpc-server`, or name running ones with --rpc")


@contextmanager
def loopback_servers(n: int, threads: int):
    """n rpc-servers on free loopback ports, stopped afterwards."""
    binary, procs, endpoints = _rpc_server(), [], []
    try:
        for _ in range(n):
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            procs.append(subprocess.Popen([str(binary), "-H", "127.0.0.1", "-p", str(port), "-t", str(threads)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            endpoints.append(f"127.0.0.1:{port}")
        for endpoint in endpoints:
            port = int(endpoint.rsplit(":", 1)[1])
            for _ in range(200):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.05)
        yield endpoints
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)


def _measure(engine: Engine, ctx: int, decode: int, drop: int, reps: int, folder: Path) -> dict:
    def run(core) -> dict:
        tokens = corpus.tokens(core.model, ctx + decode)
        prefills, decodes, rolls, saves, restores = [], [], [], [], []
        for rep in range(reps):
            s = core.new_session(f"bench{rep}")
            t0 = time.perf_counter()
            core.prefill(s, [(0, tokens[:ctx])])
            prefills.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for i in range(decode):  # one token per step, as a reply is written
                core.prefill(s, [(0, tokens[ctx + i:ctx + i + 1])])
            decodes.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            edits.roll(core, s, drop, keep=4, strategy=edits.Strategy.parse("shift"))
            core.probe(s.name, tokens[:1])  # the shift is applied by the next decode
            rolls.append(time.perf_counter() - t0)
            path = folder / f"{s.name}.kvs"
            t0 = time.perf_counter()
            persist.save(core, s, path)
            saves.append(time.perf_counter() - t0)
            core.delete_session(s.name)
            t0 = time.perf_counter()
            r = persist.restore(core, path, s.name)
            core.probe(r.name, tokens[:1])
            restores.append(time.perf_counter() - t0)
            core.delete_session(r.name)
            path.unlink()
        return {"prefill_tok_s": ctx / median(prefills), "decode_tok_s": decode / median(decodes),
                "t_roll_s": median(rolls), "t_save_s": median(saves), "t_restore_s": median(restores)}

    return engine.call(run)


def run(model: str | None, servers: list[str] | None, n_gpu_layers: int | None, ctx: int, decode: int, drop: int,
        reps: int, threads: int | None) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="kvside-bench-rpc-"))
    common = dict(model=model, n_ctx=ctx + decode + 8, max_sessions=2, n_threads=threads, sessions_dir=str(folder))

    def both(endpoints: list[str]) -> dict:
        results = {}
        with Engine(**common) as local:
            results["local"] = _measure(local, ctx, decode, drop, reps, folder)
            info = local.info()
        with Engine(rpc_servers=endpoints, n_gpu_layers=n_gpu_layers, **common) as remote:
            results["rpc"] = _measure(remote, ctx, decode, drop, reps, folder)
            layers = {k: len(v) for k, v in remote.info()["layers"].items()}
        return {"model": info["model_name"], "servers": endpoints, "layers": layers, "ctx": ctx,
                "decode_tokens": decode, "drop": drop, "reps": reps, **results}

    if servers:
        return both(servers)
    with loopback_servers(2, threads or 1) as endpoints:
        return dict(both(endpoints), loopback=True)


def table(result: dict) -> str:
    lines = [f"model {result['model']}, {result['ctx']} tokens in the cache; layers: "
             + ", ".join(f"{k} {v}" for k, v in result["layers"].items())
             + f"; servers {', '.join(result['servers'])}",
             f"{'':18} {'local':>10} {'rpc':>10} {'rpc/local':>10}"]
    for key, label in (("prefill_tok_s", "prefill tok/s"), ("decode_tok_s", "decode tok/s"),
                       ("t_roll_s", f"roll {result['drop']} (s)"), ("t_save_s", "save (s)"),
                       ("t_restore_s", "restore (s)")):
        a, b = result["local"][key], result["rpc"][key]
        lines.append(f"{label:18} {a:10.4g} {b:10.4g} {b / a if a else 0:10.3g}")
    return "\n".join(lines)
