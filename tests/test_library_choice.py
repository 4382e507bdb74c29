"""Which libllama kvside loads: LLAMA_CPP_LIB_PATH when set, else the patched build `make native`
left in the checkout, unless KVSIDE_NATIVE=off."""

import os

from kvside._llama import _choose_library


def fake_build(root, backend="cpu", stamp=True):
    folder = root / f"native-{backend}"
    (folder / "bin").mkdir(parents=True)
    (folder / "bin" / "libllama.so").write_bytes(b"")
    if stamp:
        (folder / ".kvside-patch").write_text("")
    return folder / "bin"


def test_the_patched_build_is_used_when_there_is_one(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_CPP_LIB_PATH", "")  # empty: unset for kvside, and restored after the test
    monkeypatch.delenv("KVSIDE_NATIVE", raising=False)
    lib = fake_build(tmp_path)
    assert "patched build" in _choose_library(tmp_path)
    assert os.environ["LLAMA_CPP_LIB_PATH"] == str(lib)


def test_an_explicit_path_and_the_opt_out_win(tmp_path, monkeypatch):
    fake_build(tmp_path)
    monkeypatch.setenv("LLAMA_CPP_LIB_PATH", "/somewhere")
    assert _choose_library(tmp_path) == "LLAMA_CPP_LIB_PATH=/somewhere"
    monkeypatch.setenv("LLAMA_CPP_LIB_PATH", "")
    monkeypatch.setenv("KVSIDE_NATIVE", "off")
    assert "KVSIDE_NATIVE=off" in _choose_library(tmp_path)
    assert not os.environ["LLAMA_CPP_LIB_PATH"]


def test_an_unfinished_build_is_not_used(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_CPP_LIB_PATH", "")  # empty: unset for kvside, and restored after the test
    monkeypatch.delenv("KVSIDE_NATIVE", raising=False)
    fake_build(tmp_path, stamp=False)  # make native stopped before it stamped the build
    assert "no patched build" in _choose_library(tmp_path)
    assert not os.environ["LLAMA_CPP_LIB_PATH"]
