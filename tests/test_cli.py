"""The kvside command as a user runs it: real processes, real model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

KVSIDE = str(Path(sys.executable).with_name("kvside"))


def run(*args, stdin: str | None = None, timeout: int = 180):
    return subprocess.run([KVSIDE, *args], input=stdin, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ})


def test_ask_streams_an_answer():
    out = run("ask", "-t", "0", "-n", "12", "What is the capital of France?")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()


def test_ask_reads_stdin():
    out = run("ask", "-t", "0", "-n", "6", "-", stdin="Say hello.")
    assert out.returncode == 0 and out.stdout.strip()


def test_doctor_json_reports_the_runtime():
    out = run("doctor", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["backend"] == "cpu"
    assert info["llama_cpp_python"] == "0.3.36"
    assert info["native_patch"] in (True, False)
    assert info["model"]["architecture"] == "llama"
    assert info["model"]["n_ctx_train"] == 8192
    assert info["model"]["rope_type"] == "norm"
    assert info["can_shift"] is True


def test_models_lists_the_default():
    out = run("models", "--json")
    assert out.returncode == 0
    assert any(m["name"] == "smollm2-135m" for m in json.loads(out.stdout))


@pytest.mark.parametrize(
    "args, message",
    [
        (["ask", ""], "empty"),
        (["ask", "--model", "/no/such/model.gguf", "hi"], "no model"),
        (["ask", "--model", "/etc/hostname", "hi"], "not a GGUF"),
        (["ask", "--n-ctx", "100000", "hi"], "trained for"),
        (["ask", "--top-p", "3", "hi"], "top_p"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(args, message):
    out = run(*args)
    assert out.returncode != 0
    assert message in out.stderr
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_unloadable_architecture_is_one_line(tmp_path):
    from test_models import _write_gguf

    path = tmp_path / "alien.gguf"
    _write_gguf(path, "no-such-arch")
    out = run("ask", "--model", str(path), "hi")
    assert out.returncode == 1
    assert "could not load" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("args, words", [
    (["bench", "fim", "--requests", "1"], "--requests"),
    (["bench", "latency", "--requests", "1"], "--requests"),
    (["bench", "latency", "--idle-sessions", "8", "--load-clients", "8"], "--idle-sessions"),
    (["bench", "latency", "--idle-tokens", "4000", "--n-ctx", "2048"], "--idle-tokens"),
    (["bench", "latency", "--prompt-tokens", "2000", "--n-ctx", "2048"], "--prompt-tokens"),
    (["serve", "--reuse-chunk", "-1"], "--reuse-chunk"),
    (["serve", "--reuse-repair", "-3"], "--reuse-repair"),
])
def test_bad_reuse_and_bench_arguments_are_usage_errors(args, words):
    out = run(*args, timeout=60)
    assert out.returncode == 2 and words in out.stderr and "Traceback" not in out.stderr
