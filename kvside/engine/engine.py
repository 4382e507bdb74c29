"""The engine: one thread owns the llama context (Core) and serves a queue.

Interfaces (CLI, HTTP, TUI) never touch llama.cpp: they call Engine methods, which post work to
the queue and wait for it, or return a Stream at once for generations. Work for a session that is
generating waits in that session's backlog, so requests to one session are serialized.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable

from pathlib import Path

import numpy as np

from kvside._llama import native_patch_loaded

from kvside.engine import binding, compose, compute, edits, persist, reference
from kvside.engine.core import Core, EngineConfig
from kvside.engine.fleet import Steward
from kvside.engine.jobs import LongWork
from kvside.engine.ledger import Ledger
from kvside.engine.stream import Stream
from kvside.engine.session import check_name
from kvside.engine.txn import atomic
from kvside.errors import EngineClosed, InvalidRequest, KvsideError, NoIdleSession, SessionNotFound

_STOP = object()


class Engine:
    def __init__(self, config: EngineConfig | None = None, **overrides: Any):
        self.config = config or EngineConfig()
        for key, value in overrides.items():
            if not hasattr(self.config, key):
                raise TypeError(f"unknown engine option {key}")
            setattr(self.config, key, value)
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._closed = False
        self.close_failures: list[str] = []  # sessions that could not be saved at close (persist)
        self.core: Core | None = None  # touch only from the engine thread (or via call)
        self._steward: Steward | None = None

    # -- life cycle ---------------------------------------------------------------------------
    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._run, name="kvside-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            self._thread.join()
            raise self._load_error
        if self.core.fleet is not None:  # a shared sessions folder: beat, and let go when asked
            self._steward = Steward(self, self.core.fleet)
            self._steward.start()
        return self

    def close(self) -> None:
        if self._thread is None or self._closed:
            return
        self._closed = True
        compute.release(self)  # other engines' compute goes elsewhere from now on
        if self._steward is not None:
            self._steward.stop()
        self._queue.put(_STOP)
        self._thread.join()

    def __enter__(self) -> "Engine":
        return self.start() if self._thread is None else self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self) -> None:
        try:
            self.core = Core(self.config)
        except BaseException as exc:  # reported to start()'s caller
            self._load_error = exc
            self._ready.set()
            return
        core = self.core
        core.compute = lambda fn, *args: compute.run(self, fn, *args)
        self._ready.set()
        try:
            while True:
                block = not core.active and not core.ready
                try:
                    item = self._queue.get(block=block)
                except queue.Empty:
                    item = None
                while item is not None:
                    if item is _STOP:
                        return
                    self._dispatch(item)
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        item = None
                while core.ready:
                    self._dispatch(core.ready.pop(0))
                if core.active:
                    try:
                        core.step()
                    except Exception as exc:  # a bug must cost the requests in flight, not the engine
                        core.scheduler.fail_all(KvsideError(f"internal error: {type(exc).__name__}: {exc}"))
        finally:
            self.close_failures = core.close()
            self._drain()

    def _dispatch(self, item) -> None:
        fn, session, future = item
        core = self.core
        if session is not None and session in core.sessions and core.sessions[session].busy:
            core.sessions[session].backlog.append(item)
            return
        if not future.running() and not future.set_running_or_notify_cancel():
            return
        try:
            result = fn(core)
        except NoIdleSession as exc:
            if any(s.busy for s in core.sessions.values()):
                core.waiting.append(item)  # tried again when a session is free (tasks that need a
                return  # sequence take it before they change anything)
            future.set_exception(exc)
            return
        except BaseException as exc:
            future.set_exception(exc)
            return
        if isinstance(result, LongWork):  # long work: it advances between decode steps, then resolves
            core.jobs.start(result.steps, future, result.session, result.needs_job_seq)
        else:
            future.set_result(result)

    def _drain(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP:
                item[2].set_exception(EngineClosed("the engine has stopped"))

    @property
    def fleet(self):
        """The leases of a sessions folder shared with other daemons (None: not shared)."""
        return self.core.fleet if self.core is not None else None

    # -- posting work ---------------------------------------------------------------------------
    def submit(self, fn: Callable[[Core], Any], *, session: str | None = None) -> Future:
        """Run fn(core) on the engine thread; with `session`, after that session's current work."""
        if self._closed or self._thread is None:
            raise EngineClosed("the engine is not running")
        future: Future = Future()
        self._queue.put((fn, session, future))
        return future

    def call(self, fn: Callable[[Core], Any], *, session: str | None = None, timeout: float | None = None) -> Any:
        return self.submit(fn, session=session).result(timeout)

    # -- sessions -------------------------------------------------------------------------------
    def new_session(self, name: str | None = None, system: str | None = None) -> str:
        return self.call(lambda core: core.new_session(name, system).name)

    def delete_session(self, name: str, forget_file: bool = True) -> None:
        self.call(lambda core: core.delete_session(name, forget_file), session=name)

    def rename(self, name: str, new_name: str) -> None:
        def apply(core):
            check_name(new_name)
            if core.known(new_name):
                raise InvalidRequest(f"session {new_name!r} already exists")
            s = core.get(name)
            if core.fleet is not None:
                core.fleet.claim(new_name)
            core.sessions[new_name] = core.sessions.pop(name)
            s.name = new_name
            core.let_go(name)
        self.call(apply, session=name)

    def sessions(self) -> list[dict]:
        def listing(core):
            if core.fleet is not None:  # other daemons save and delete sessions in the folder too
                persist.known_again(core)
            rows = [dict(s.summary(), resident=True) for s in core.sessions.values()]
            rows += [{"name": n, "resident": False, "path": str(p)} for n, p in core.evicted.items()]
            return rows
        return self.call(listing)

    def save(self, name: str, path: str | None = None) -> dict:
        """Write the session to a file anywhere (default: its place in the sessions folder). For
        the user's own tools; clients of the daemon save by name (save_as)."""
        return self._edit(name, lambda core, s: persist.save(core, s, Path(path) if path else persist.session_path(core, name)))

    def save_as(self, name: str, as_name: str | None = None) -> dict:
        """Save the session in the sessions folder under its name or `as_name`, which must not be
        another session's. A copy under another name is then a saved session of that name."""
        def apply(core, s):
            target = check_name(s.name if as_name is None else as_name)
            if target != s.name and core.known(target):
                raise InvalidRequest(f"{target!r} is another session's name; save under a free name", param="as")
            path = persist.session_path(core, target)
            out = persist.save(core, s, path)
            if target != s.name:
                core.evicted[target] = path
            out.pop("path")
            return dict(out, file=path.name, saved_as=target)
        return self._edit(name, apply)

    def restore(self, path: str, name: str | None = None) -> str:
        """Load a session file from anywhere (the user's own act: CLI, chat app, an upload). The
        file is read a chunk at a time between decode steps."""
        def task(core):
            return LongWork(_named(persist.restore_steps(core, Path(path), name)))
        return self.call(task)

    def restore_named(self, saved: str, name: str | None = None) -> str:
        """Load the saved session `saved` from the sessions folder, as `name` (default: its own)."""
        def apply(core):
            path = persist.session_path(core, saved)
            if not path.is_file():
                raise SessionNotFound(f"no saved session named {saved!r}")
            if (name or saved) == saved and core.on_disk(saved):
                return persist.bring_back(core, saved).name
            return LongWork(_named(persist.restore_steps(core, path, name or saved)))
        return self.call(apply)

    def session_file(self, name: str) -> Path:
        """The session's file in the sessions folder, saved now if the session is resident."""
        def apply(core):
            if name in core.sessions:
                s = core.sessions[name]
                path = persist.session_path(core, name)
                persist.save(core, s, path)
                return path
            if name in core.evicted:
                return core.evicted[name]
            raise SessionNotFound(f"no session named {name!r}")
        return self.call(apply, session=name)

    def show(self, name: str) -> dict:
        """Everything about a session: summary, messages, cache map, removed cells, edit log."""
        def apply(core):
            s = core.get(name)
            return {"session": s.summary(), "messages": [m.to_dict() for m in s.messages],
                    "cache_map": s.ledger.runs(), "removed": [vars(r) for r in s.ledger.removed],
                    "next_pos": s.ledger.next_pos, "n_ctx": core.n_ctx, "edit_log": s.edit_log}
        return self.call(apply, session=name)

    def evict(self, name: str) -> str:
        """Send a session to disk now; it comes back on its next use."""
        return str(self._edit(name, lambda core, s: persist.evict(core, s) or ""))

    def ledger(self, name: str) -> Ledger:
        return self.call(lambda core: core.get(name).ledger.copy(), session=name)

    def messages(self, name: str) -> list[dict]:
        return self.call(lambda core: [m.to_dict() for m in core.get(name).messages], session=name)

    def check(self, name: str) -> dict:
        """Assert that the session's ledger equals the cache; returns the cache's view."""
        return self.call(lambda core: core.check(name), session=name)

    def fidelity(self, name: str, tokens: int = 64) -> dict:
        """The session's cache against a re-prefill of the same tokens, on its last message
        (reference.against_reprefill); the session is left as it was."""
        return self.call(lambda core: reference.against_reprefill(core, core.get(name), tokens), session=name)

    def next_logits(self, name: str, tokens: list[int] | None = None, all_logits: bool = False) -> np.ndarray:
        return self.call(lambda core: core.probe(name, tokens, all_logits), session=name)

    # -- edits (each runs after the session's current work) -----------------------------------
    def _edit(self, name: str, fn) -> Any:
        return self.call(lambda core: fn(core, core.get(name)), session=name)

    def _atomic_edit(self, name: str, fn) -> Any:
        """An edit that leaves the session as it was if any of its steps fails (txn.atomic)."""
        def apply(core, s):
            with atomic(core, s):
                return fn(core, s)
        return self._edit(name, apply)

    def _atomic_job(self, name: str, make_steps, needs_job_seq: bool = False) -> Any:
        """The same for an edit written as a job (jobs.py): it advances between decode steps, so
        other sessions keep streaming while it re-prefills or writes a summary."""
        def task(core):
            steps = _atomically(core, core.get(name), make_steps)
            return LongWork(steps, session=name, needs_job_seq=needs_job_seq)
        return self.call(task, session=name)

    def roll(self, name: str, drop: int, keep: int | None = None, strategy: str | None = None,
             boundary: bool = False) -> dict:
        return self._atomic_job(name, lambda core, s: edits.roll_steps(core, s, drop, keep, strategy or s.roll_strategy,
                                                                       boundary))

    def mask(self, name: str, messages: list[int] | None = None, span: tuple[int, int] | None = None,
             close_gap: bool = False, strategy: str = "shift") -> dict:
        return self._atomic_job(name, lambda core, s: edits.mask_steps(core, s, messages, span, close_gap,
                                                                       strategy=strategy))

    def compact(self, name: str, up_to: int, summary: str | None = None, mode: str = "mask") -> dict:
        return self._atomic_job(name, lambda core, s: edits.compact_steps(core, s, up_to, summary, mode),
                                needs_job_seq=summary is None)

    def prune(self, name: str, kind: str = "tool", keep_last: int = 1, close_gap: bool = False) -> dict:
        return self._atomic_edit(name, lambda core, s: edits.prune(core, s, kind, keep_last, close_gap))

    def erratum(self, name: str, text: str) -> dict:
        return self._atomic_edit(name, lambda core, s: edits.erratum(core, s, text))

    def fork(self, name: str, new_name: str | None = None) -> str:
        return self._edit(name, lambda core, s: edits.fork(core, s, new_name)[0].name)

    def set_roll_strategy(self, name: str, strategy: str) -> None:
        def apply(core, s):
            s.roll_strategy = str(edits.Strategy.parse(strategy))
        self._edit(name, apply)

    def set_prune_tools(self, name: str, keep_last: int | None) -> None:
        """The session's tool-result policy: keep the last `keep_last` when the window fills (None: off)."""
        def apply(core, s):
            s.prune_tools = keep_last
        self._edit(name, apply)

    def edit_log(self, name: str) -> list[dict]:
        return self._edit(name, lambda core, s: list(s.edit_log))

    # -- documents ------------------------------------------------------------------------------
    def compile(self, path: str, progress=None) -> dict:
        """Compute and store a document's KV blocks (reused when content and model match). It
        runs a block chunk at a time between decode steps: streams of other sessions go on."""
        return self.call(lambda core: LongWork(compose.compile_steps(core, Path(path), progress=progress),
                                               needs_job_seq=True))

    def attach(self, name: str, document: str, recompute: int = 0, strategy: str | None = None) -> dict:
        """Splice a compiled document into the session: no prefill of the document."""
        return self._atomic_edit(name, lambda core, s: compose.attach(core, s, document, recompute, strategy))

    def attach_documents(self, name: str, documents: list[str], recompute: int = 0,
                         strategy: str | None = None) -> list[dict]:
        """Several documents at once: select:F then spends one budget over all their blocks."""
        return self._atomic_edit(name, lambda core, s: compose.attach_documents(core, s, documents, recompute,
                                                                                  strategy))

    @staticmethod
    def documents() -> dict:
        return compose.load_index()

    # -- generation -----------------------------------------------------------------------------
    def chat(self, session: str, message: str | list[dict], on_event=None, **params: Any) -> Stream:
        """Append message(s) to a chat session and stream the reply. `on_event` (called on the
        engine thread for every event) lets an asyncio loop be woken without polling."""
        messages = [{"role": "user", "content": message}] if isinstance(message, str) else list(message)
        return self._generate(session, params, lambda core, p, st: core.start_chat(session, messages, p, st), on_event)

    def again(self, session: str, on_event=None, **params: Any) -> Stream:
        """Another reply to the session's last message (a chat app's regenerate): its last reply's
        cells go and only the generation prompt is read, as when a client sends its history again
        without that reply (binding.diff)."""
        return self._bind(lambda core, stream: binding.answer_again(core, session, params, stream), session, on_event)

    def complete(self, session: str, text: str, on_event=None, **params: Any) -> Stream:
        """Append raw text to a session and stream its continuation (no chat template)."""
        return self._generate(session, params, lambda core, p, st: core.start_text(session, text, p, st), on_event)

    def complete_tokens(self, session: str, tokens: list[int], on_event=None, **params: Any) -> Stream:
        return self._generate(session, params, lambda core, p, st: core.start_tokens(session, tokens, p, st), on_event)

    def bind_chat(self, messages: list[dict], *, session: str | None = None, reuse: bool = True,
                  documents: list[str] = (), on_event=None, reply=None, **params: Any) -> Stream:
        """Answer a client's whole message array: the engine picks the session that holds the
        longest match (or `session`, created if unknown), edits it to match and starts the reply
        in one task (binding.bind_and_start). The stream's first event is "bound", with the
        session's name and what was reused."""
        return self._bind(lambda core, stream: binding.bind_and_start(
            core, messages, params, stream, session=session, reuse=reuse, documents=list(documents), reply=reply),
            session, on_event)

    def bind_text(self, *, text: str | None = None, tokens=None, session: str | None = None,
                  on_event=None, reply=None, reuse: bool = True, **params: Any) -> Stream:
        """A text completion in `session` (created if unknown, the prompt appended), or bound to
        the text cache that shares most of the prompt (binding.bind_text)."""
        return self._bind(lambda core, stream: binding.bind_text(core, params, stream, text=text, tokens=tokens,
                                                                 session=session, reply=reply, reuse=reuse),
                          session, on_event)

    def _bind(self, start, session: str | None, on_event, refuse_cancelled: bool = True) -> Stream:
        """Post start(core, stream) as one task (after `session`'s current work, if named). With
        refuse_cancelled, a stream cancelled before the task runs ends with an error instead."""
        stream = Stream(session or "")
        stream.on_event = on_event

        def run(core: Core) -> None:
            if refuse_cancelled and stream.cancelled:
                return stream.fail(KvsideError("cancelled before it started"))
            try:
                start(core, stream)
            except NoIdleSession:
                raise  # the engine holds the task until a session is free
            except KvsideError as exc:
                stream.fail(exc)

        future = self.submit(run, session=session)
        future.add_done_callback(lambda f: f.exception() and stream.fail(_as_kvside(f.exception())))
        return stream

    def _generate(self, session: str, params: dict, start, on_event=None) -> Stream:
        """A generation in a known session with its sampling defaults under `params`. A cancel
        that comes before it starts is seen by the scheduler, which ends it as "cancelled"."""
        return self._bind(lambda core, stream: start(core, core.get(session).defaults.replace(**params), stream),
                          session, on_event, refuse_cancelled=False)

    # -- facts ----------------------------------------------------------------------------------
    def info(self) -> dict:
        def facts(core: Core) -> dict:
            from kvside._llama import library_choice, library_path, system_info
            from llama_cpp import __version__ as bindings_version

            return {
                "backend": core.backend,
                "n_gpu_layers": core.n_gpu_layers,
                "rpc_devices": core.rpc_devices,
                "layers": _layers_by_device(core.model.layer_devices),
                "llama_cpp_python": bindings_version,
                "library": library_path(),
                "library_choice": library_choice,
                "native_patch": native_patch_loaded(),
                "attention": core.attention,
                "system_info": system_info().strip(),
                "model_name": core.model_name,
                "model": core.model.info().to_dict(),
                "chat_template": {"name": core.template_choice.name, "why": core.template_choice.why},
                "n_ctx": core.n_ctx,
                "n_cells": core.n_cells,
                "max_sessions": core.max_sessions,
                "n_batch": core.n_batch,
                "n_threads": core.n_threads,
                "can_shift": core.mem.can_shift(),
                "sliding_window": core.n_swa,
                "recurrent": core.recurrent,
                "swa_full": core.config.swa_full,
                "checkpoints": core.config.checkpoints if (core.recurrent or core.n_swa) else 0,
            }

        return self.call(facts)


def _atomically(core, s, make_steps):
    """A job's steps inside a snapshot of its session (txn.atomic), taken when the job starts."""
    with atomic(core, s):
        return (yield from make_steps(core, s))


def _layers_by_device(layer_devices: dict[int, str]) -> dict[str, list[int]]:
    by_device: dict[str, list[int]] = {}
    for layer in sorted(layer_devices):
        by_device.setdefault(layer_devices[layer], []).append(layer)
    return by_device


def _named(steps):
    """A restore job's result: the restored session's name."""
    return (yield from steps).name


def _as_kvside(exc: BaseException) -> KvsideError:
    return exc if isinstance(exc, KvsideError) else KvsideError(f"internal error: {exc}")
