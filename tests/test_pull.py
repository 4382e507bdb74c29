"""`kvside pull OWNER/REPO[:QUANT]`, `kvside models`, `kvside rm` against a local stand-in for the
hub (fakehub.py, through HF_ENDPOINT): the quant chosen from the repository's GGUFs, split models,
checksums, offline use, a killed pull resumed, and the pulled name usable as --model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fakehub import FakeHub, Repo
from tinygguf import write

REPO = "someone/Tiny-Chat-GGUF"


def tiny_bytes(tmp: Path, name: str, seed: int, **kw) -> dict[str, bytes]:
    """The files of one tiny model: {file name: bytes}, several when split."""
    folder = tmp / f"{name}.d"
    folder.mkdir()
    write("llama", folder / f"{name}.gguf", seed=seed, **kw)
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hubfiles")
    return {
        "Q4_K_M": tiny_bytes(tmp, "Tiny-Chat-Q4_K_M", 1),
        "Q8_0": tiny_bytes(tmp, "Tiny-Chat-Q8_0", 2),
        "split": tiny_bytes(tmp, "Tiny-Chat-F16", 3, split_max_tensors=8),
    }


@pytest.fixture
def hub(models):
    h = FakeHub()
    files = {**models["Q4_K_M"], **models["Q8_0"], "README.md": b"# tiny", "mmproj-Tiny-Chat-F16.gguf": b"GGUF0"}
    files.update(models["split"])
    h.repos[REPO] = Repo(files)
    yield h
    h.close()


@pytest.fixture
def env(tmp_path, hub):
    return {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "KVSIDE_HOME": str(tmp_path / "home"),
            "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "KVSIDE_NATIVE": "off"}


def kvside(env, *args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvside.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_pull_takes_the_usual_quant_and_the_name_works_everywhere(env, models):
    done = kvside(env, "pull", REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{REPO}:Q4_K_M"
    listing = json.loads(kvside(env, "models", "--json").stdout)
    pulled = next(m for m in listing if m["source"] == "hub")
    assert pulled["name"] == f"{REPO}:Q4_K_M" and pulled["size"] == len(models["Q4_K_M"]["Tiny-Chat-Q4_K_M.gguf"])
    assert Path(pulled["path"]).read_bytes() == models["Q4_K_M"]["Tiny-Chat-Q4_K_M.gguf"]
    # by its full name, by the repository alone (one quant pulled), with the hub's prefix
    for name in (f"{REPO}:Q4_K_M", REPO, f"hf.co/{REPO}:q4_k_m"):
        ask = kvside(env, "ask", "--model", name, "-n", "2", "--temperature", "0", "hello")
        assert ask.returncode == 0, (name, ask.stderr)
    again = kvside(env, "pull", REPO)
    assert again.returncode == 0 and "already pulled" in again.stderr


def test_pull_a_named_quant_and_refuse_one_that_is_not_there(env, models):
    done = kvside(env, "pull", f"{REPO}:q8_0")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{REPO}:Q8_0"
    missing = kvside(env, "pull", f"{REPO}:Q2_K")
    assert missing.returncode == 1
    assert "has no Q2_K GGUF" in missing.stderr and "Q4_K_M" in missing.stderr and "Q8_0" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_a_split_model_is_pulled_whole_and_loads(env, models):
    parts = sorted(models["split"])
    assert len(parts) > 1 and "-00001-of-" in parts[0]
    done = kvside(env, "pull", f"{REPO}:F16")
    assert done.returncode == 0, done.stderr
    listing = json.loads(kvside(env, "models", "--json").stdout)
    pulled = next(m for m in listing if m["name"] == f"{REPO}:F16")
    assert pulled["size"] == sum(len(b) for b in models["split"].values())
    assert Path(pulled["path"]).name == parts[0]
    ask = kvside(env, "ask", "--model", f"{REPO}:F16", "-n", "2", "--temperature", "0", "hello")
    assert ask.returncode == 0, ask.stderr


def test_a_download_that_does_not_match_its_checksum_is_removed_and_not_named(env, hub):
    hub.repos[REPO].corrupt.add("Tiny-Chat-Q4_K_M.gguf")
    done = kvside(env, "pull", REPO)
    assert done.returncode == 1
    assert "does not match the hub's checksum" in done.stderr
    assert not [m for m in json.loads(kvside(env, "models", "--json").stdout) if m["source"] == "hub"]
    blobs = list((Path(env["HF_HOME"]) / "hub").rglob("blobs/*"))
    assert not [b for b in blobs if b.is_file() and not b.name.endswith(".lock")], blobs


def test_offline_a_pulled_model_is_used_and_an_unknown_one_is_a_clear_error(env):
    assert kvside(env, "pull", REPO).returncode == 0
    offline = {**env, "HF_HUB_OFFLINE": "1"}
    again = kvside(offline, "pull", REPO)
    assert again.returncode == 0 and "offline" in again.stderr and again.stdout.strip() == f"{REPO}:Q4_K_M"
    other = kvside(offline, "pull", "someone/Other-GGUF")
    assert other.returncode == 1 and "was not pulled before" in other.stderr
    unreachable = {**env, "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens there
    reused = kvside(unreachable, "pull", REPO)
    assert reused.returncode == 0 and "unreachable" in reused.stderr


def test_a_killed_pull_resumes_where_it_stopped(env, hub):
    # 24 MB served at 8 MB/s: killed once the first megabytes are on disk
    big = b"GGUF" + os.urandom(24 * 1024 * 1024)
    hub.repos["someone/Big-GGUF"] = Repo({"Big-Q4_K_M.gguf": big})
    hub.slow = 8_000_000
    proc = subprocess.Popen([sys.executable, "-m", "kvside.cli", "pull", "someone/Big-GGUF"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    incomplete = []
    deadline = time.time() + 60
    while time.time() < deadline and not incomplete and proc.poll() is None:
        time.sleep(0.05)
        incomplete = [p for p in (Path(env["HF_HOME"]) / "hub").rglob("*.incomplete") if p.stat().st_size >= 2 << 20]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert incomplete, "the pull never got under way"
    assert not [m for m in json.loads(kvside(env, "models", "--json").stdout) if m["source"] == "hub"]
    hub.slow = None
    done = kvside(env, "pull", "someone/Big-GGUF")
    assert done.returncode == 0, done.stderr
    resumed = [r for name, r in hub.ranges if name == "Big-Q4_K_M.gguf" and r]
    assert resumed and int(resumed[-1].split("=")[1].split("-")[0]) >= 2 << 20, hub.ranges  # went on, not over
    pulled = next(m for m in json.loads(kvside(env, "models", "--json").stdout) if m["source"] == "hub")
    assert Path(pulled["path"]).read_bytes() == big


def test_rm_forgets_a_pulled_model_and_its_files(env):
    assert kvside(env, "pull", REPO).returncode == 0
    path = Path(next(m for m in json.loads(kvside(env, "models", "--json").stdout) if m["source"] == "hub")["path"])
    blob = path.resolve()
    done = kvside(env, "rm", REPO)
    assert done.returncode == 0, done.stderr
    assert not path.exists() and not blob.exists()
    assert not [m for m in json.loads(kvside(env, "models", "--json").stdout) if m["source"] == "hub"]
    gone = kvside(env, "rm", REPO)
    assert gone.returncode == 1 and "no model named" in gone.stderr
    ask = kvside(env, "ask", "--model", f"{REPO}:Q4_K_M", "hello")
    assert ask.returncode == 1 and f"kvside pull {REPO}:Q4_K_M" in ask.stderr


def test_unknown_repositories_and_revisions_are_clear_errors(env):
    missing = kvside(env, "pull", "nobody/Nothing-GGUF")
    assert missing.returncode == 1 and "no repository nobody/Nothing-GGUF" in missing.stderr
    revision = kvside(env, "pull", f"{REPO}@v9")
    assert revision.returncode == 1 and "has no revision 'v9'" in revision.stderr
    nonsense = kvside(env, "pull", "not a name")
    assert nonsense.returncode == 1 and "not a hub model name" in nonsense.stderr


def test_the_default_model_is_marked_and_can_be_chosen(env):
    listing = kvside({**env, "KVSIDE_MODEL": ""}, "models")
    assert listing.returncode == 0
    marked = [line for line in listing.stdout.splitlines() if line.startswith("*")]
    assert len(marked) == 2 and "default:" in marked[1]  # the row and the line that says why
    assert kvside(env, "pull", REPO).returncode == 0
    chosen = kvside({**env, "KVSIDE_MODEL": REPO}, "models")
    assert f"* default: {REPO} (set by $KVSIDE_MODEL)" in chosen.stdout
    row = next(line for line in chosen.stdout.splitlines() if REPO in line and not line.startswith("* default"))
    assert row.startswith("*")


def test_a_new_revision_replaces_the_old_one_and_keeps_unchanged_files(env, hub):
    assert kvside(env, "pull", REPO).returncode == 0
    first = Path(next(m for m in json.loads(kvside(env, "models", "--json").stdout) if m["source"] == "hub")["path"])
    hub.repos[REPO].commit = "fedcba9876543210fedcba9876543210fedcba98"  # same files, a new commit
    done = kvside(env, "pull", REPO)
    assert done.returncode == 0 and "already pulled" not in done.stderr, done.stderr
    second = Path(next(m for m in json.loads(kvside(env, "models", "--json").stdout) if m["source"] == "hub")["path"])
    assert "fedcba98" in str(second) and second.is_file()  # the blob both revisions name is still there
    assert not first.exists()  # the old revision's link is gone
    ask = kvside(env, "ask", "--model", REPO, "-n", "2", "--temperature", "0", "hello")
    assert ask.returncode == 0, ask.stderr


# -- Ollama's /api/pull and /api/delete on a daemon ------------------------------------------------------
@pytest.fixture
def daemon(env):
    """A daemon that may load a second model (the pulled one) on demand."""
    import socket

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "kvside.cli", "serve", "--port", str(port), "--n-ctx", "256",
                             "--threads", "2", "--max-sessions", "1", "--max-models", "2"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health").status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(timeout=60)


def test_ollama_client_pulls_uses_and_deletes_a_hub_model(daemon, models):
    """`ollama pull hf.co/OWNER/REPO:QUANT` against the daemon: progress lines with bytes, then the
    model is listed, answers by its name, and is deleted with its files."""
    import ollama

    client = ollama.Client(host=daemon)
    lines = list(client.pull(f"hf.co/{REPO}:Q8_0", stream=True))
    assert lines[0].status == "pulling manifest" and lines[-1].status == "success"
    size = len(models["Q8_0"]["Tiny-Chat-Q8_0.gguf"])
    done = [p for p in lines if p.total == size and p.completed == size]
    assert done and done[-1].digest.startswith("sha256:")
    name = f"{REPO}:Q8_0"
    assert name in [m.model.removesuffix(":latest") for m in client.list().models]
    reply = client.generate(model=name, prompt="hello", raw=True, options={"num_predict": 2, "temperature": 0})
    assert reply.done
    client.delete(name)
    assert name not in [m.model.removesuffix(":latest") for m in client.list().models]
    with pytest.raises(ollama.ResponseError) as err:
        client.delete(name)
    assert err.value.status_code == 404


def test_pull_refuses_what_it_cannot_pull_with_the_reason(daemon):
    import httpx

    library = httpx.post(daemon + "/api/pull", json={"model": "llama3.2:1b", "stream": False})
    assert library.status_code == 404 and "Ollama's library" in library.json()["error"]
    missing = httpx.post(daemon + "/api/pull", json={"model": "hf.co/nobody/Nothing-GGUF", "stream": False})
    assert missing.status_code == 500 and "no repository nobody/Nothing-GGUF" in missing.json()["error"]
    streamed = [json.loads(line) for line in httpx.post(daemon + "/api/pull", json={"model": "nobody/Nothing-GGUF"},
                                                        timeout=60).text.splitlines()]
    assert "no repository" in streamed[-1]["error"]
    served = httpx.request("DELETE", daemon + "/api/delete", json={"model": "smollm2-135m"})
    assert served.status_code == 400 and "serves" in served.json()["error"]
    local = httpx.post(daemon + "/api/pull", json={"model": "smollm2-135m", "stream": False})
    assert local.status_code == 200 and local.json() == {"status": "success"}
