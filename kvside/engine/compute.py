"""Which thread runs llama.cpp's compute (llama_decode, llama_encode) in this process.

libgomp keeps an OpenMP thread pool for every thread that has run a parallel region, for as long
as that thread lives. Once a process holds more pool threads than it has cores, libgomp stops
spinning between regions and every decode pays for sleeping and waking its workers: on the 2-core
machine a daemon that had also decoded with a second model fell from 143 to 104 tok/s on the first
(docs/benchmarks.md, "Two models in one daemon"). So one engine thread computes for every engine
in the process: the first to ask owns it; the others post their calls to the owner's queue, where
they run between its own steps, and wait. When the owner closes, the next engine to ask takes over
(the old owner's pool goes with its thread).
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Callable

from kvside.errors import EngineClosed

_lock = threading.Lock()
_owner = None  # the Engine whose thread computes for this process
_gone: "weakref.WeakSet" = weakref.WeakSet()  # engines closing: they never take over


def run(engine, fn: Callable[..., Any], *args) -> Any:
    """fn(*args) on the compute thread. `engine`: the caller's, on its own thread."""
    global _owner
    while True:
        with _lock:
            if _owner is None and engine not in _gone:
                _owner = engine
            owner = _owner
            here = owner is None or owner is engine  # a closing engine's last steps run where they are
        if here:
            return fn(*args)
        try:
            return owner.call(lambda _core: fn(*args))
        except EngineClosed:  # the owner closed meanwhile: ask again (this engine may take over)
            with _lock:
                if _owner is owner:
                    _owner = None


def release(engine) -> None:
    """`engine` is closing: it computes for no one from now on."""
    global _owner
    with _lock:
        _gone.add(engine)
        if _owner is engine:
            _owner = None
