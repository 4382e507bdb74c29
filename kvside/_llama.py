"""The one place that loads llama.cpp.

`lib` is llama-cpp-python's low-level ctypes module. `LLAMA_CPP_LIB_PATH` makes it load another
libllama with the same bindings. Without it, the patched build `make native` leaves in this
checkout (build/native-BACKEND/bin) is loaded when there is one, so the native strategies work
without the user exporting anything; KVSIDE_NATIVE=off keeps the stock library (the stock test pass
sets it). `library_choice` says which was loaded and why (`kvside doctor`).
"""

from __future__ import annotations

import collections
import ctypes
import os
import threading
from pathlib import Path


def _choose_library(build: Path = Path(__file__).resolve().parents[1] / "build") -> str:
    """Set LLAMA_CPP_LIB_PATH to this checkout's patched build unless told otherwise; says why."""
    if os.environ.get("LLAMA_CPP_LIB_PATH"):
        return f"LLAMA_CPP_LIB_PATH={os.environ['LLAMA_CPP_LIB_PATH']}"
    if os.environ.get("KVSIDE_NATIVE", "auto").lower() in ("off", "0", "no"):
        return "llama-cpp-python's own (KVSIDE_NATIVE=off)"
    for backend in ("cuda", "metal", "vulkan", "cpu"):  # a GPU build, when one was made, is the one wanted
        folder = build / f"native-{backend}"
        if (folder / ".kvside-patch").exists() and any((folder / "bin").glob("libllama.*")):
            os.environ["LLAMA_CPP_LIB_PATH"] = str(folder / "bin")
            return f"the patched build in {folder / 'bin'} (make native; KVSIDE_NATIVE=off for the stock one)"
    return "llama-cpp-python's own (no patched build: make native)"


library_choice = _choose_library()

import llama_cpp  # noqa: E402,F401  (loads libllama before numpy; see kvside/__init__.py)
from llama_cpp import llama_cpp as lib  # noqa: E402

# llama.cpp logs a lot to stderr. Keep the last lines so a failed load can say why, and show
# nothing unless KVSIDE_LLAMA_LOG=1.
_recent: collections.deque[str] = collections.deque(maxlen=64)
_log_lock = threading.Lock()
_echo = os.environ.get("KVSIDE_LLAMA_LOG") == "1"


_captures: list[list[str]] = []  # lists taking every line, while their callers asked (capture_log)


@lib.llama_log_callback
def _log_callback(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    line = text.decode("utf-8", errors="replace")
    with _log_lock:
        _recent.append(line)
        for lines in _captures:
            lines.append(line)
    if _echo:
        print(line, end="", file=__import__("sys").stderr)


lib.llama_log_set(_log_callback, ctypes.c_void_p(0))
lib.llama_backend_init()


class capture_log:
    """`with capture_log() as lines:` collects every line llama.cpp logs meanwhile (a model load
    reports which device holds each layer only in its log). Loads in other threads add theirs."""

    def __enter__(self) -> list[str]:
        self.lines: list[str] = []
        with _log_lock:
            _captures.append(self.lines)
        return self.lines

    def __exit__(self, *exc) -> None:
        with _log_lock:
            _captures[:] = [lines for lines in _captures if lines is not self.lines]


def recent_log(n: int = 8) -> str:
    """The last `n` non-empty lines llama.cpp logged, for error messages."""
    with _log_lock:
        lines = [line.strip() for line in _recent if line.strip()]
    return " | ".join(lines[-n:])


def system_info() -> str:
    return lib.llama_print_system_info().decode("utf-8", errors="replace")


def backend() -> str:
    """'cuda', 'metal', 'vulkan' or 'cpu': what this libllama was built to use."""
    info = system_info().upper()
    for name, marker in (("cuda", "CUDA"), ("metal", "MTL"), ("metal", "METAL"), ("vulkan", "VULKAN")):
        if marker in info:
            return name
    return "cpu"


def library_path() -> str:
    return getattr(lib._lib, "_name", "?")


def has_symbol(name: str) -> bool:
    try:
        getattr(lib._lib, name)
    except AttributeError:
        return False
    return True


def native_patch_loaded() -> bool:
    """True when libllama carries kvside's native patch (native/): it exports this symbol."""
    return has_symbol("llama_kvside_patch_version")
