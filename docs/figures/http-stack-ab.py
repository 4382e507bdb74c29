"""A/B: the daemon's HTTP stack on asyncio+h11 (A) against uvloop+httptools (B), same model, the
two daemons taking turns request by request. Run with the venv's python: python docs/figures/http-stack-ab.py"""
import json, os, statistics, subprocess, sys, time
import httpx

PORTS = {"A": 8971, "B": 8972}
STACKS = {"A": ("asyncio", "h11"), "B": ("uvloop", "httptools")}
# `kvside serve` with uvicorn's loop and HTTP implementation named (it picks the fastest installed)
LAUNCH = ("import functools, sys, uvicorn; uvicorn.run = functools.partial(uvicorn.run, loop=sys.argv.pop(1), "
          "http=sys.argv.pop(1)); from kvside.cli import main; sys.exit(main())")
procs = {}
for name, port in PORTS.items():
    e = dict(os.environ, KVSIDE_HOME=f"/tmp/kvab-{name}")
    procs[name] = subprocess.Popen([sys.executable, "-c", LAUNCH, *STACKS[name], "serve", "-m", "smollm2-135m",
                                    "--port", str(port), "--threads", "2", "--n-ctx", "2048", "--max-sessions", "8"],
                                   env=e, stdout=subprocess.DEVNULL, stderr=open(f"/tmp/kvab-{name}.log", "w"))
for name, port in PORTS.items():
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
client = httpx.Client(timeout=60)
QUESTIONS = [f"Question {i}: what is {i} plus {i * 3}, and why does it matter for a {w}?" for i, w in
             enumerate(["cat", "dog", "tree", "car", "house", "river", "cloud", "book"] * 12)]

def ttft(port, q):
    t0 = time.perf_counter()
    first = None
    with client.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions",
                       json={"messages": [{"role": "user", "content": q}], "max_tokens": 8, "temperature": 0,
                             "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content"' in line and first is None and '"content":""' not in line:
                first = time.perf_counter() - t0
    return first, time.perf_counter() - t0

def health(port):
    t0 = time.perf_counter()
    client.get(f"http://127.0.0.1:{port}/health")
    return time.perf_counter() - t0

out = {"A": {"ttft": [], "total": [], "health": []}, "B": {"ttft": [], "total": [], "health": []}}
for q in QUESTIONS[:4]:  # warm-up
    for port in PORTS.values():
        ttft(port, q)
order = ["A", "B"]
for i, q in enumerate(QUESTIONS[4:84]):
    for name in (order if i % 2 == 0 else order[::-1]):
        f, t = ttft(PORTS[name], q)
        out[name]["ttft"].append(f)
        out[name]["total"].append(t)
for i in range(300):
    for name in (order if i % 2 == 0 else order[::-1]):
        out[name]["health"].append(health(PORTS[name]))
for p in procs.values():
    p.terminate()
for p in procs.values():
    p.wait(timeout=60)
summary = {}
for name in PORTS:
    summary[name] = {k: round(statistics.median(v) * 1000, 2) for k, v in out[name].items()}
    summary[name]["ttft_p90"] = round(statistics.quantiles(out[name]["ttft"], n=10)[-1] * 1000, 2)
paired = [b / a for a, b in zip(out["A"]["ttft"], out["B"]["ttft"])]
summary["paired_ttft_B_over_A"] = round(statistics.median(paired), 3)
print(json.dumps(summary, indent=1))
