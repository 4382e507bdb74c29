"""The engine core: owns the llama context and runs on one thread only (see engine.py).

Every session is one sequence of a unified KV cache. Core holds the context, the model, the
sessions and the synchronous decode helpers edits use; the generations in progress are the
Scheduler's (scheduler.py), long work is the JobRunner's (jobs.py), and prompt assembly is
prompt.py's. `step` is one round of both: one llama_decode for the generations, one chunk of a job.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvside._llama import backend, lib, recent_log
from kvside.engine import families, native, persist, prompt, rpc
from kvside.engine.fleet import Leases
from kvside.engine.batch import Batch
from kvside.engine.costs import DecodeCosts
from kvside.engine.decode import decode_error
from kvside.engine.embed import Embedder, normalized
from kvside.engine.jobs import JOB_CHUNK, JobRunner
from kvside.engine.memory import Memory
from kvside.engine.model import Model
from kvside.engine.scheduler import Scheduler
from kvside.engine.session import Message, Session, check_name
from kvside.engine.state import get_seq_state, set_seq_state
from kvside.engine import toolcalls
from kvside.engine.template import ChatTemplate
from kvside.errors import (
    CacheFull,
    ContextFull,
    EditError,
    EngineClosed,
    InvalidRequest,
    KvsideError,
    SessionBusy,
    SessionNotFound,
)
from kvside.home import subdir
from kvside.models import resolve

log = logging.getLogger("kvside")


@dataclass
class EngineConfig:
    model: str | None = None
    # a built-in template's name or a template file; None: the GGUF's own, else its family's
    chat_template: str | None = None
    n_ctx: int = 2048  # the window each session sees (positions 0..n_ctx-1)
    max_sessions: int = 4  # sessions resident in the cache at once
    n_batch: int = 512
    n_threads: int | None = None
    n_gpu_layers: int | None = None  # None: every layer on a GPU backend, none on CPU
    default_system: str | None = None
    # agents: when the window fills, mask the cells of old tool results (keeping the last N)
    # before any whole turn is rolled away; None leaves tool results to rolling like any turn
    prune_tools: int | None = None
    # text prompts (autocomplete, /completion): after the first change, runs of at least this many
    # tokens that the cache also holds are moved into place instead of read again (0: the common
    # prefix only)
    reuse_chunk: int = 64
    # of each moved run, the first tokens computed again after its new context (measured on
    # llama.vscode's trace: `kvside bench fim`, docs/benchmarks.md)
    reuse_repair: int = 16
    # caches that cannot go back (recurrent states, sliding windows): context checkpoints kept per
    # session, taken at message boundaries, so an edit that goes back reads from the nearest one
    # instead of from the first token (checkpoints.py; 0: none)
    checkpoints: int = 8
    # sliding-window models (Gemma 3, gpt-oss): the windowed layers' cache at full size, so every
    # edit can move cells (llama.cpp shifts an iSWA cache only when both parts have one size), or
    # at the window's size (a fraction of the memory; rolls and masks then read again, from the
    # nearest checkpoint)
    swa_full: bool = True
    # embeddings: an embedding GGUF (name or path) run in its own context; None: the chat model's
    # hidden states, mean-pooled (a context made on the first request)
    embedding_model: str | None = None
    sessions_dir: str | None = None  # where idle sessions go (default: $KVSIDE_HOME/sessions)
    persist: bool = False  # save resident sessions on close, know saved ones on start
    # the sessions folder is shared with other daemons (fleet.py): a session is open on one of them
    # at a time, is handed over when another one is asked for it, and is saved after every reply
    # so a daemon that dies loses at most the reply it was writing
    shared_sessions: bool = False
    lease_ttl_s: float = 15.0  # a daemon that has not beaten for this long is taken for dead
    # llama.cpp's RPC backend: HOST:PORT of rpc-servers holding layers (loopback only unless
    # rpc_allow_remote), and each offload device's share of the layers (RPC servers first)
    rpc_servers: list[str] | None = None
    rpc_allow_remote: bool = False
    tensor_split: list[float] | None = None
    flash_attn: bool | None = None  # None: llama.cpp decides; False for bit-exact references and restores
    # exact: flash attention off, so restores and re-prefills reproduce a cache bit for bit (the
    # setting of fidelity measurements; see _new_context).
    exact: bool = False
    # Native patch, CPU: flash attention with ggml's reference kernels. They visit the unmasked cells
    # one by one in cell order, so cells computed in place equal a re-prefill's bit for bit; a row
    # still depends on the order its cells sit in (a restore or a probe in another hole rounds
    # differently), which flash attention off does not show in the same tests.
    reference_kernels: bool = False


class Core:
    def __init__(self, config: EngineConfig):
        self.config = config
        ref = resolve(config.model)
        self.backend = backend()
        # layers on rpc-servers of other hosts (rpc.py): they count as offload devices
        servers = rpc.parse_servers(config.rpc_servers, config.rpc_allow_remote)
        self.rpc_devices = [d.to_dict() for d in rpc.connect(servers)]
        n_gpu_layers = config.n_gpu_layers
        if n_gpu_layers is None:
            n_gpu_layers = 999 if self.backend != "cpu" or servers else 0
        self.n_gpu_layers = n_gpu_layers
        self.model = Model(ref.path, n_gpu_layers=n_gpu_layers, devices=rpc.model_devices(servers),
                           tensor_split=config.tensor_split)
        self.model_name = ref.name
        try:  # a bad setting is refused before the context is made, and frees the model
            self._check_config(config, ref.name)
            self.template_choice = families.choose(self.model, config.chat_template)
        except BaseException:
            self.model.close()
            raise
        self.n_ctx = config.n_ctx
        self.max_sessions = config.max_sessions
        # After the sessions' sequences: scratch space for edits (used and cleared within one
        # engine task), then the sequence long jobs work in across scheduler steps (compiling a
        # document, writing a summary), so an edit's scratch use never disturbs a job's.
        self.scratch_seq = config.max_sessions
        self.job_seq = config.max_sessions + 1
        self.n_seq_max = config.max_sessions + 2
        self.n_cells = config.n_ctx * (config.max_sessions + 1)
        self.n_batch = config.n_batch
        try:
            self.ctx = self._new_context(config)
        except BaseException:
            self.model.close()
            raise
        self.n_swa = lib.llama_model_n_swa(self.model.ptr)
        self.recurrent = bool(lib.llama_model_is_recurrent(self.model.ptr) or lib.llama_model_is_hybrid(self.model.ptr))
        self.mem = Memory(self.ctx, n_swa=self.n_swa, recurrent=self.recurrent, n_seq=self.n_seq_max)
        self.mem.on_shared_write = self.unshare
        self.batch = Batch(self.n_batch)
        self.costs = DecodeCosts(self.n_batch)
        self.snapshot_buffer = None  # kept between edits' snapshots (txn): see there
        self.template = ChatTemplate(
            self.template_choice.source,
            bos_token=self.model.token_text(self.model.bos) if self.model.bos >= 0 else "",
            eos_token=self.model.token_text(self.model.eos) if self.model.eos >= 0 else "",
        )
        self.tool_format = toolcalls.detect(self.template_choice.source)  # how this model writes tool calls
        self.sessions: dict[str, Session] = {}
        self.evicted: dict[str, Path] = {}  # sessions on disk, restored on first use
        # of those, request binding's: their tools, what each holds (persist.SavedAuto)
        self.auto_saved: dict[str, persist.SavedAuto] = {}
        self.auto_stamps: dict[str, tuple[int, int] | None] = {}  # with a shared folder: their files as saved
        # with a shared folder: other daemons' request-bound sessions, (file stamp, tools, history)
        self.folder_index: dict[str, tuple] = {}
        self.sessions_dir = Path(config.sessions_dir) if config.sessions_dir else subdir("sessions")
        self.sessions_dir.mkdir(parents=True, exist_ok=True)
        self.type_k = self.type_v = "f16"  # llama.cpp's default KV types; recorded in session files
        self.free_seqs = list(range(self.scratch_seq))
        self.ready: list = []  # deferred work whose session became free
        self.waiting: list = []  # work that needs a sequence while every session is busy
        self.scheduler = Scheduler(self)
        self.jobs = JobRunner(self)
        self._spent = {"gens": 0.0, "jobs": 0.0}  # engine time each side used while both had work
        self._counter = 0
        self.decode_seconds = 0.0  # wall time inside llama_decode (the rest of a request is overhead)
        # how llama.cpp's compute is run: here, or on the process's compute thread (the Engine sets it)
        self.compute = None
        self._embedder: Embedder | None = None
        if config.embedding_model:  # loaded now: a bad file is an error at start, not at the first request
            try:
                self._embedder = Embedder(self.model, resolve(config.embedding_model).path, self.n_ctx,
                                          self.n_threads, n_gpu_layers, compute=self._compute)
            except BaseException:
                self.batch.close()
                lib.llama_free(self.ctx)
                self.model.close()
                raise
        self.fleet: Leases | None = None
        if config.shared_sessions:
            if not config.persist:
                raise InvalidRequest("shared sessions need a persisting engine")
            self.fleet = Leases(self.sessions_dir, ttl_s=config.lease_ttl_s)
        if config.persist:
            persist.scan(self)

    def _check_config(self, config: EngineConfig, model_name: str) -> None:
        info = self.model.info()
        if config.n_ctx < 16:
            raise InvalidRequest(f"n_ctx {config.n_ctx} is too small (minimum 16)")
        if config.n_ctx > info.n_ctx_train:
            raise InvalidRequest(f"n_ctx {config.n_ctx} is above what {model_name} was trained for ({info.n_ctx_train})")
        if not 1 <= config.max_sessions <= 63:
            raise InvalidRequest("max_sessions must be between 1 and 63")
        if config.checkpoints < 0:
            raise InvalidRequest("checkpoints must be 0 or more")

    def _new_context(self, config: EngineConfig):
        params = lib.llama_context_default_params()
        params.n_ctx = self.n_cells
        params.n_batch = self.n_batch
        params.n_ubatch = self.n_batch
        params.n_seq_max = self.n_seq_max
        params.kv_unified = True  # cells can move between sequences (seq_cp, forks, blocks)
        params.swa_full = config.swa_full
        params.no_perf = True
        # Measured on CPU: with flash attention (llama.cpp's default) a row's result depends on
        # where its cells sit in the cache (a re-prefill or a restore into other cells moved
        # logits by up to 0.45; on the patched build a decode row depends only on its own cells'
        # order, a prompt's rows still on how its cells fall into tiles of 64), but not on which
        # other sessions share its batch (under the small-batch rule below). Without it, a
        # restore or a re-prefill reproduces the cache bit for bit, but a decode batch holding
        # several sessions rounds differently from a solo one. Serving keeps the default;
        # fidelity measurements and exact restores turn it off.
        if config.flash_attn is not None:
            params.flash_attn_type = 1 if config.flash_attn else 0
        if config.exact and config.reference_kernels:
            raise InvalidRequest("exact (flash attention off) and reference_kernels exclude each other")
        if config.reference_kernels and not (native.available() and self.backend == "cpu"):
            raise InvalidRequest("reference kernels need kvside's native patch on a CPU build")
        if config.reference_kernels and self.rpc_devices:
            # the patch switches this process's CPU kernels; layers on rpc-servers keep theirs
            raise InvalidRequest("reference kernels run on this machine's CPU only, not on rpc-servers' layers")
        if config.exact:
            params.flash_attn_type = 0
        if config.reference_kernels:
            params.flash_attn_type = 1
        threads = config.n_threads or os.cpu_count() or 2
        params.n_threads = threads
        params.n_threads_batch = threads
        ctx = lib.llama_init_from_model(self.model.ptr, params)
        if not ctx:
            raise KvsideError(f"llama.cpp could not create a context: {recent_log(3)}")
        if config.reference_kernels:
            native.set_exact(ctx, True)
        self.attention = "flash attention, reference kernels" if config.reference_kernels else \
            "flash attention off" if config.exact else \
            {None: "llama.cpp default", True: "flash attention", False: "flash attention off"}[config.flash_attn]
        self.n_threads = threads
        return ctx

    def close(self) -> list[str]:
        """Stop every generation and every waiting request, save resident sessions (with persist),
        free llama.cpp. Returns one line per session that could not be saved (also logged)."""
        closed = EngineClosed("the engine has stopped")
        self.scheduler.stop_all(closed)
        self.jobs.stop_all(closed)
        waiting = self.ready + self.waiting + [item for s in self.sessions.values() for item in s.backlog]
        self.ready, self.waiting = [], []
        for s in self.sessions.values():
            s.backlog.clear()
        for _fn, _session, future in waiting:
            if future.running() or future.set_running_or_notify_cancel():
                future.set_exception(closed)
        failures = []
        if self.config.persist and self.ctx:
            for s in list(self.sessions.values()):
                if s.temporary or s.text_cache or not any(m.role != "system" for m in s.messages):
                    continue  # nothing was said in it: nothing to keep
                try:
                    persist.save(self, s, persist.session_path(self, s.name))
                except KvsideError as exc:
                    failures.append(f"session {s.name} was not saved: {exc.message}")
                    log.error("session %s was not saved: %s", s.name, exc.message)
        self.close_failures = failures
        if self.fleet is not None:
            self.fleet.close()  # saved: other daemons may open them now
        if self._embedder is not None:
            self._embedder.close()
            self._embedder = None
        self.batch.close()
        if self.ctx:
            lib.llama_free(self.ctx)
            self.ctx = None
        self.model.close()
        return failures

    # -- sessions -----------------------------------------------------------------------------
    def get(self, name: str) -> Session:
        s = self.sessions.get(name)
        if s is not None:
            return s
        if self.on_disk(name):
            return persist.bring_back(self, name)
        raise SessionNotFound(f"no session named {name!r}")

    def known(self, name: str) -> bool:
        """Whether a session of that name exists, resident or on disk."""
        return name in self.sessions or self.on_disk(name)

    def on_disk(self, name: str) -> bool:
        """Whether `name` is a session saved in the sessions folder (and not resident). With a
        shared folder the folder is asked, not the memory of it: another daemon may have saved,
        handed over or deleted the session since."""
        if self.fleet is not None and name not in self.sessions:
            path = persist.session_path(self, name)
            if path.is_file():
                self.evicted.setdefault(name, path)
            else:
                self.evicted.pop(name, None)
                self.auto_saved.pop(name, None)
        return name in self.evicted

    def free_name(self, prefix: str = "s") -> str:
        """A session name that no resident session, known saved session or file in the sessions
        folder has (a file there may belong to a run that did not persist)."""
        while True:
            self._counter += 1
            name = f"{prefix}{self._counter}"
            if name not in self.sessions and name not in self.evicted and \
                    not (self.sessions_dir / f"{name}{persist.SUFFIX}").exists() and \
                    (self.fleet is None or self.fleet.try_claim(name)):  # not another daemon's new one
                return name

    def take_seq(self, keep: set[str] = frozenset()) -> int:
        """A free sequence, sending the least recently used idle session to disk if there is none
        (never one named in `keep`). The sequence is empty."""
        if not self.free_seqs:
            persist.make_room(self, keep)
        seq = self.free_seqs.pop(0)
        self.mem.clear_seq(seq)
        return seq

    def give_seq(self, seq: int) -> None:
        self.mem.clear_seq(seq)
        self.free_seqs.append(seq)
        self.free_seqs.sort()
        self.session_freed()

    def session_freed(self) -> None:
        """A session went idle or a sequence came free: work waiting for one may run now."""
        self.ready.extend(self.waiting)
        self.waiting.clear()

    def new_session(self, name: str | None = None, system: str | None = None,
                    keep: set[str] = frozenset()) -> Session:
        """A new empty session (with the system prompt decoded). `keep`: sessions that must stay
        resident to make room (a fork's parent). On failure nothing is registered or held."""
        name = check_name(name) if name is not None else self.free_name()
        if self.known(name):
            raise InvalidRequest(f"session {name!r} already exists")
        if self.fleet is not None:
            self.fleet.claim(name)
        try:
            seq = self.take_seq(keep)
        except BaseException:
            self.let_go(name)
            raise
        session = Session(name=name, seq=seq, prune_tools=self.config.prune_tools)
        system = system if system is not None else self.config.default_system
        try:
            if system:
                session.messages.append(Message(0, "system", system, pinned=True))
                session.closing = ""
                self.prefill(session, prompt.chat_pieces(self, session, session.messages[:1], generation=False, history=[]))
        except BaseException:
            self.give_seq(seq)
            self.let_go(name)
            raise
        self.sessions[name] = session
        return session

    def let_go(self, name: str) -> None:
        """`name` is no longer resident here: with a shared folder, another daemon may open it."""
        if self.fleet is not None:
            self.fleet.release(name)

    def after_reply(self, s: Session) -> None:
        """With a shared folder every reply is saved before its client hears that it ended: the
        daemon that opens the session next, after a hand-over or after this one died, continues
        from every reply a client has seen."""
        if self.fleet is None or s.temporary or s.text_cache or s.name not in self.sessions:
            return
        if not self.fleet.still_holds(s.name) and not self.fleet.try_claim(s.name):
            # this daemon was taken for dead and another one opened the session: it is theirs
            log.error("session %s was opened by another daemon meanwhile: dropped here, not saved", s.name)
            self.delete_session(s.name)
            return
        try:
            persist.save(self, s, persist.session_path(self, s.name))
        except KvsideError as exc:
            log.error("session %s was not saved after its reply: %s", s.name, exc.message)

    def delete_session(self, name: str, forget_file: bool = False) -> None:
        if name not in self.sessions and name in self.evicted:
            self.auto_saved.pop(name, None)
            path = self.evicted.pop(name)
            if forget_file:
                path.unlink(missing_ok=True)
            return
        session = self.get(name)
        if session.busy:
            raise SessionBusy(f"session {name!r} is generating; cancel it first")
        self.give_seq(session.seq)
        del self.sessions[name]
        self.let_go(name)
        if forget_file:
            persist.session_path(self, name).unlink(missing_ok=True)

    def used_cells(self) -> int:
        return sum(len(s.ledger) for s in self.sessions.values())

    def check(self, name: str) -> dict:
        """Compare the ledger with the cache; raises AssertionError on a mismatch."""
        s = self.get(name)
        wrong = self.span_mismatch(s.seq, s.ledger.pos)
        assert wrong is None, wrong
        return {"pos_min": self.mem.pos_min(s.seq), "pos_max": self.mem.pos_max(s.seq), "n_cells": len(s.ledger)}

    def span_mismatch(self, seq: int, positions: list[int]) -> str | None:
        """How seq's cells disagree with the positions a ledger says it holds, or None. llama.cpp
        tells the first and last position: on a sliding window the first is the windowed layers'
        (anywhere from the ledger's first to the window's), on a recurrent state the last read."""
        lo, hi = self.mem.pos_min(seq), self.mem.pos_max(seq)
        if not positions:
            return None if lo == hi == -1 else f"the ledger is empty but the cache holds {lo}..{hi}"
        if hi != positions[-1]:
            return f"the cache ends at {hi}, the ledger at {positions[-1]}"
        if self.recurrent:
            return None
        if self.n_swa:
            # (what the next token sees: a restored state may lack the window's oldest cell)
            in_window = next(p for p in positions if p >= hi + 2 - self.n_swa)
            if not positions[0] <= lo <= in_window:
                return (f"the cache starts at {lo}: not between the ledger's first position {positions[0]} "
                        f"and the window's {in_window}")
            return None
        return None if lo == positions[0] else f"the cache starts at {lo}, the ledger at {positions[0]}"

    def room_check(self, s: Session, n_new: int) -> None:
        """ContextFull when s has no room for n_new more positions; CacheFull when the shared
        cache has no cells for them."""
        if s.ledger.next_pos + n_new >= self.n_ctx:
            raise ContextFull(
                f"the prompt needs {n_new} more tokens but session {s.name!r} has "
                f"{self.n_ctx - s.ledger.next_pos} of {self.n_ctx} positions left"
            )
        if self.used_cells() + n_new + 1 > self.n_cells:
            raise CacheFull(f"the shared KV cache is full ({self.used_cells()} of {self.n_cells} cells)")

    def clear_pending(self, s: Session) -> None:
        s.pending, s.pending_msg, s.closing = [], -1, ""

    # -- embeddings -----------------------------------------------------------------------------
    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = Embedder(self.model, None, self.n_ctx, self.n_threads, compute=self._compute)
        return self._embedder

    def embed(self, inputs: list, truncate: bool = True, normalize: bool = True) -> tuple[list[np.ndarray], int]:
        """Vectors of texts or token lists, and the tokens read. Every input is checked before
        any is run."""
        e = self.embedder
        token_lists = [e.fit(e.tokenize(x) if isinstance(x, str) else list(x), truncate) for x in inputs]
        vectors = [e.embed(t) for t in token_lists]
        return [normalized(v) if normalize else v for v in vectors], sum(len(t) for t in token_lists)

    # -- synchronous decoding (edits, probes, system prompts) -----------------------------------
    def decode_now(self, seq: int, tokens: list[int], start: int, logits: str = "last") -> np.ndarray | None:
        """Decode tokens into seq at positions start.. in batch-sized chunks, now. `logits` is
        'none', 'last' (1-d array) or 'all' (n x vocab). On failure the written cells are removed."""
        assert logits in ("none", "last", "all")
        rows: list[np.ndarray] = []
        n_vocab = self.model.n_vocab
        for c0 in range(0, len(tokens), self.n_batch):
            chunk = tokens[c0 : c0 + self.n_batch]
            self.batch.clear()
            for i, tok in enumerate(chunk):
                last = c0 + i == len(tokens) - 1
                want = logits == "all" or (logits == "last" and last)
                self.batch.add(tok, start + c0 + i, seq, want)
            rc = self.llama_decode(self.batch)
            if rc != 0:
                self.mem.rm(seq, start, -1)
                raise decode_error(rc)
            if logits == "all":
                for i in range(len(chunk)):
                    rows.append(_logits_row(self.ctx, i, n_vocab))
        if logits == "none" or not tokens:
            return None
        if logits == "last":
            return _logits_row(self.ctx, self.batch.n - 1, n_vocab)
        return np.stack(rows)

    def decode_steps(self, seq: int, tokens: list[int], start: int, chunk: int = JOB_CHUNK):
        """decode_now in chunks of `chunk` tokens for a job: yields before every chunk but the
        first, so other sessions decode in between. The last chunk asks for its last row of
        logits; nothing yields after it, so the caller can sample from it before anyone else
        decodes. On failure the cells written so far are removed."""
        for c0 in range(0, len(tokens), chunk):
            if c0:
                yield
            part = tokens[c0 : c0 + chunk]
            last = c0 + len(part) == len(tokens)
            self.batch.clear()
            for i, tok in enumerate(part):
                self.batch.add(tok, start + c0 + i, seq, last and i == len(part) - 1)
            rc = self.llama_decode(self.batch)
            if rc != 0:
                self.mem.rm(seq, start, -1)
                raise decode_error(rc)

    def _compute(self, fn, *args):
        return self.compute(fn, *args) if self.compute is not None else fn(*args)

    def _timed_decode(self, batch: Batch) -> tuple[int, float]:
        t0 = time.perf_counter()
        rc = lib.llama_decode(self.ctx, batch.raw)
        return rc, time.perf_counter() - t0

    def llama_decode(self, batch: Batch) -> int:
        """Every llama_decode the engine runs goes through here: timed for /metrics, and taught to
        the cost model (a pending K-shift is applied by this decode, and priced by it)."""
        shifted = self.mem.shift_pending
        depth = self.used_cells()
        if self.n_swa or self.recurrent:
            for seq, pos in batch.starts.items():
                if not self.mem.window_ok(seq, pos):
                    raise EditError(self.mem.window_lost(pos))
            self.mem.before_decode()
        rc, seconds = self._compute(self._timed_decode, batch)  # timed where it runs, not waited for
        self.decode_seconds += seconds
        if rc == 0:
            self.mem.shift_pending = False
            self.costs.record(batch.n, depth, seconds, shifted)
        return rc

    def unshare(self, seq: int) -> None:
        """Give seq copies of its own of every cell it holds (through a state copy), so cells it
        shares with another session can move or be rewritten without touching the other. Checked
        for room first: on failure nothing has changed."""
        owner = next((s for s in self.sessions.values() if s.seq == seq), None)
        need = len(owner.ledger) if owner is not None else self.mem.pos_max(seq) + 1
        if self.used_cells() + need > self.n_cells:
            raise CacheFull(f"no room to give {owner.name if owner else 'a sequence'} its own copy of the cells it "
                            f"shares ({need} cells)")
        self.settle()
        blob = get_seq_state(self.ctx, seq)
        self.mem.clear_seq(seq)
        set_seq_state(self.ctx, seq, blob)
        self.mem.state_restored(seq)

    def settle(self) -> None:
        """Apply a pending K-shift now, by decoding one token into the scratch sequence."""
        if not self.mem.shift_pending:
            return
        scratch = self.scratch_seq
        pos = self.mem.pos_max(scratch) + 1
        self.decode_now(scratch, [max(self.model.bos, 0)], pos, logits="none")
        self.mem.rm(scratch, pos, -1)
        self.mem.shift_pending = False

    def seq_state(self, seq: int, into=None):
        """The sequence's state (llama_state_seq_get_data) with every shift applied to its keys
        (`into`: see state.get_seq_state)."""
        self.settle()
        return get_seq_state(self.ctx, seq, into)

    def prefill(self, s: Session, pieces: list[tuple[int, list[int]]]) -> None:
        tokens = [t for _, toks in pieces for t in toks]
        self.room_check(s, len(tokens))
        start = s.ledger.next_pos
        self.decode_now(s.seq, tokens, start, logits="none")
        for msg_id, toks in pieces:
            s.ledger.append(toks, msg_id)

    def probe(self, name: str, tokens: list[int] | None = None, all_logits: bool = False) -> np.ndarray:
        """Logits after feeding `tokens` (default: the session's pending tokens, else a newline)
        to the session; the cache is left exactly as it was."""
        s = self.get(name)
        if s.busy:
            raise SessionBusy(f"session {name!r} is generating")
        if tokens is None:
            tokens = list(s.pending) or self.model.tokenize("\n", parse_special=False)
        start = s.ledger.next_pos
        if start + len(tokens) > self.n_ctx:
            raise ContextFull("probe does not fit in the window")
        with self._trial(s) as seq:
            out = self.decode_now(seq, tokens, start, logits="all" if all_logits else "last")
        assert out is not None
        return out

    def greedy(self, name: str, first: list[int], n: int) -> list[int]:
        """The greedy continuation after feeding `first`; the cache is left as it was."""
        s = self.get(name)
        start = s.ledger.next_pos
        out: list[int] = []
        with self._trial(s) as seq:
            logits = self.decode_now(seq, first, start, logits="last")
            pos = start + len(first)
            while len(out) < n and pos < self.n_ctx:
                out.append(int(np.argmax(logits)))
                logits = self.decode_now(seq, [out[-1]], pos, logits="last")
                pos += 1
        return out

    @contextmanager
    def _trial(self, s):
        """A sequence to try tokens on after s's cells, as it was afterwards: s's own, the tried
        cells removed after; for a recurrent state, which cannot give back what it read, a copy
        of it in the scratch sequence; for a sliding window, the scratch sequence sharing s's cells
        (shared cells are never taken for others, and s's last position, by which llama.cpp
        frees its old cells, does not move)."""
        if not (self.recurrent or self.n_swa):
            start = s.ledger.next_pos
            try:
                yield s.seq
            finally:
                self.mem.rm(s.seq, start, -1)
            return
        self.mem.clear_seq(self.scratch_seq)
        self.mem.cp(s.seq, self.scratch_seq, -1, -1)
        try:
            yield self.scratch_seq
        finally:
            self.mem.clear_seq(self.scratch_seq)

    # -- the loop's work ------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self.scheduler.active or self.jobs.active

    def step(self) -> None:
        """One llama_decode over every active generation, or one chunk of a job. While both have
        work, each gets half of the engine's time: a long compile or re-prefill slows the other
        streams to about half speed, with gaps of one chunk, instead of stopping them."""
        gens, jobs = self.scheduler.active, self.jobs.active
        if not (gens and jobs):
            self._spent = {"gens": 0.0, "jobs": 0.0}  # no credit carried over from a time alone
        side = "jobs" if jobs and (not gens or self._spent["gens"] >= self._spent["jobs"]) else "gens"
        t0 = time.perf_counter()
        if side == "gens":
            self.scheduler.step()
        else:
            self.jobs.advance()
        self._spent[side] += time.perf_counter() - t0

    def start_chat(self, name: str, messages: list[dict], params, stream, reply=None, shared: int = 0,
                   recheck: list[int] = (), again: bool = False) -> None:
        self.scheduler.start_chat(name, messages, params, stream, reply, shared, recheck, again)

    def start_text(self, name: str, text: str, params, stream, reply=None) -> None:
        self.scheduler.start_text(name, text, params, stream, reply)

    def start_tokens(self, name: str, tokens: list[int], params, stream, reply=None) -> None:
        self.scheduler.start_tokens(name, tokens, params, stream, reply)


def _logits_row(ctx, index: int, n_vocab: int) -> np.ndarray:
    ptr = lib.llama_get_logits_ith(ctx, index)
    return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(n_vocab,)).copy()
