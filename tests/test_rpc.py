"""A model split over machines with llama.cpp's RPC backend, on loopback: two `rpc-server`
processes (CPU) hold most layers, the local CPU the rest. Every cache edit runs where the cells
are; each step's next-token logits are compared with the same steps on a local engine."""

import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from kvside.bench import corpus
from kvside.engine import Engine, native, rpc
from kvside.errors import InvalidRequest

from conftest import GREEDY

ROOT = Path(__file__).resolve().parents[1]
RPC_SERVER = ROOT / "build" / "rpc-cpu" / "bin" / "ggml-rpc-server"
PROBE = [198, 504, 260, 1115]
N_GPU_LAYERS = 20  # of SmolLM2's 30 (and its output layer): 0-9 stay on this machine's CPU


def test_rpc_hosts_are_loopback_unless_allowed():
    assert rpc.parse_servers("127.0.0.1:50052,localhost:50053,[::1]:50054") == \
        ["127.0.0.1:50052", "localhost:50053", "[::1]:50054"]
    with pytest.raises(InvalidRequest, match="--rpc-allow-remote"):
        rpc.parse_servers("10.0.0.5:50052")
    assert rpc.parse_servers("10.0.0.5:50052", allow_remote=True) == ["10.0.0.5:50052"]
    for bad in ("nohost", "127.0.0.1:", "127.0.0.1:99999", "127.0.0.1:1,127.0.0.1:1"):
        with pytest.raises(InvalidRequest):
            rpc.parse_servers(bad)


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def servers():
    if not rpc.supported():
        pytest.skip("this llama.cpp was built without the RPC backend (make setup builds it unless RPC=0)")
    if not RPC_SERVER.exists():
        pytest.skip("no rpc-server (make rpc-server)")
    procs, endpoints = [], []
    for _ in range(2):
        port = _port()
        procs.append(subprocess.Popen([str(RPC_SERVER), "-H", "127.0.0.1", "-p", str(port), "-t", "1"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        endpoints.append(f"127.0.0.1:{port}")
    for proc, endpoint in zip(procs, endpoints):
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", int(endpoint.rsplit(":", 1)[1])), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read().decode()
                time.sleep(0.05)
    yield endpoints
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def pair(servers, tmp_path_factory):
    """The same engine twice: layers over RPC, and all local. Flash attention off, so a step's
    result does not depend on where its cells sit."""
    folder = tmp_path_factory.mktemp("rpc-sessions")
    args = dict(n_ctx=320, max_sessions=3, n_threads=1, exact=True, sessions_dir=str(folder))
    remote = Engine(rpc_servers=servers, n_gpu_layers=N_GPU_LAYERS, tensor_split=[1, 1], **args).start()
    local = Engine(**args).start()
    yield remote, local
    remote.close()
    local.close()


def test_layers_are_split_over_both_servers_and_the_local_cpu(pair, servers):
    remote, local = pair
    info = remote.info()
    names = {d["name"]: d["description"] for d in info["rpc_devices"]}
    assert sorted(names.values()) == sorted(servers)
    layers = info["layers"]
    assert set(layers) == {"CPU", *names}, layers
    first_offloaded = 30 + 1 - N_GPU_LAYERS  # llama.cpp offloads the last layers, and the output (30)
    assert layers["CPU"] == list(range(first_offloaded))
    held = sorted(n for device in names for n in layers[device])
    assert held == list(range(first_offloaded, 31))
    assert all(layers[device] for device in names)  # each server holds a share
    assert "layers" in local.info() and set(local.info()["layers"]) == {"CPU"}


def _filled(engine, n=240) -> str:
    name = engine.new_session()
    engine.call(lambda core: core.prefill(core.get(name), [(0, corpus.tokens(core.model, n))]))
    return name


def _steps(engine, tmp: Path) -> list[tuple[str, np.ndarray]]:
    """Every kind of edit, with the next-token logits after each."""
    out = []
    name = _filled(engine)
    out.append(("prefill", engine.next_logits(name, PROBE, all_logits=True)))
    engine.roll(name, 60, keep=4, strategy="shift")  # the K shift runs where the cells are
    engine.check(name)
    before = engine.next_logits(name, PROBE, all_logits=True)
    out.append(("roll shift", before))
    # saved (the state read back from the servers) and restored (sent to them again) while the
    # cells are in order: a restore is exact then, over RPC as locally (after a hole the cells
    # come back in another order, and this model's logits move with the order of a sum)
    path = tmp / f"{name}.kvs"
    engine.save(name, str(path))
    engine.delete_session(name)
    name = engine.restore(str(path))
    engine.check(name)
    after = engine.next_logits(name, PROBE, all_logits=True)
    np.testing.assert_array_equal(after, before)
    out.append(("restore", after))
    engine.roll(name, 40, keep=4, strategy="recompute:16")  # the scratch sequence's decode
    engine.check(name)
    out.append(("roll recompute:16", engine.next_logits(name, PROBE, all_logits=True)))
    engine.mask(name, span=(30, 50))
    engine.check(name)
    out.append(("mask", engine.next_logits(name, PROBE, all_logits=True)))
    if native.available():
        engine.roll(name, 20, keep=4, strategy="values:16")  # the patch's in-place recompute
        engine.check(name)
        out.append(("roll values:16", engine.next_logits(name, PROBE, all_logits=True)))
    child = engine.fork(name)
    engine.check(child)
    out.append(("fork", engine.next_logits(child, PROBE, all_logits=True)))
    engine.delete_session(child)
    engine.delete_session(name)
    return out


def test_every_edit_over_rpc_gives_the_local_logits(pair, tmp_path):
    remote, local = pair
    got, want = _steps(remote, tmp_path / "r"), _steps(local, tmp_path / "l")
    assert [s for s, _ in got] == [s for s, _ in want]
    for (step, a), (_, b) in zip(got, want):
        diff = float(np.abs(a - b).max())
        print(f"{step}: max |rpc - local| = {diff:.3g}")
        # the same CPU kernels on both sides; only the graph's split across backends differs
        assert diff < 1e-3, f"{step}: logits differ by {diff}"
        assert (a.argmax(-1) == b.argmax(-1)).all(), step


def test_a_chat_over_rpc(pair):
    remote, local = pair
    replies = []
    for engine in (remote, local):
        name = engine.new_session(system="You are brief.")
        text = engine.chat(name, "Name three colours.", max_tokens=12, **GREEDY).text()
        engine.check(name)
        replies.append(text)
        engine.delete_session(name)
    assert replies[0] and replies[0] == replies[1]


def test_reference_kernels_are_refused_with_layers_on_rpc_servers(servers):
    if not native.available():
        pytest.skip("reference kernels need the native patch")
    with pytest.raises(InvalidRequest, match="rpc-servers"):
        Engine(n_ctx=128, max_sessions=1, n_threads=1, rpc_servers=servers, reference_kernels=True).start()


def test_an_rpc_server_that_does_not_answer_is_a_clear_error():
    if not rpc.supported():
        pytest.skip("this llama.cpp was built without the RPC backend")
    with pytest.raises(rpc.RpcUnavailable, match="no rpc-server answers at 127.0.0.1:"):
        Engine(n_ctx=128, max_sessions=1, rpc_servers=[f"127.0.0.1:{_port()}"]).start()


def test_kvside_doctor_names_the_servers_and_their_layers(servers):
    from kvside.bench.rpc import loopback_servers

    # servers of its own: an rpc-server serves one client at a time, and this process holds the others
    with loopback_servers(2, threads=1) as fresh:
        out = subprocess.run([str(Path(sys.executable).with_name("kvside")), "doctor", "--rpc", ",".join(fresh),
                              "--n-gpu-layers", str(N_GPU_LAYERS), "--threads", "1"],
                             capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for endpoint in fresh:
        assert f"at {endpoint}" in out.stdout, out.stdout
    assert "layers on CPU" in out.stdout
