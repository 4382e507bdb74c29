import kvside  # noqa: F401  (llama.cpp before numpy)

import os
import tempfile

import pytest

# Every test runs against a throwaway kvside home; nothing touches the user's files.
os.environ.setdefault("KVSIDE_HOME", tempfile.mkdtemp(prefix="kvside-test-home-"))

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
