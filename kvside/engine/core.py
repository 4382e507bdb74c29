"""The engine core: owns the llama context and runs on one thread only (see engine.py).

Every session is one sequence of a unified KV cache. Each step packs the next tokens of every
active generation (one token for those decoding, a share of the batch for those prefilling) into
one llama_decode, then samples each one's next token from its own row of logits.
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kvside._llama import backend, lib, recent_log
from kvside.engine import edits, native, persist
from kvside.engine.jobs import JOB_CHUNK, Job
from kvside.engine.batch import Batch
from kvside.engine.memory import Memory
from kvside.engine.model import Model
from kvside.engine.sampling import Sampler, SamplingParams, StopMatcher
from kvside.engine.session import Message, Session, check_name
from kvside.engine.state import get_seq_state
from kvside.engine.stream import Completion, Event, Stream, Usage
from kvside.engine.template import ChatTemplate, TemplateError
from kvside.errors import (
    CacheFull,
    ContextFull,
    DecodeError,
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

PREFILL = "prefill"
DECODE = "decode"
SMALL_BATCH = 64


@dataclass
class EngineConfig:
    model: str | None = None
    n_ctx: int = 2048  # the window each session sees (positions 0..n_ctx-1)
    max_sessions: int = 4  # sessions resident in the cache at once
    n_batch: int = 512
    n_threads: int | None = None
    n_gpu_layers: int | None = None  # None: every layer on a GPU backend, none on CPU
    default_system: str | None = None
    sessions_dir: str | None = None  # where idle sessions go (default: $KVSIDE_HOME/sessions)
    persist: bool = False  # save resident sessions on close, know saved ones on start
    flash_attn: bool | None = None  # None: llama.cpp decides; False for bit-exact references and restores
    # exact: flash attention off, so restores and re-prefills reproduce a cache bit for bit (the
    # setting of fidelity measurements; see _new_context).
    exact: bool = False
    # Native patch, CPU: flash attention with ggml's reference kernels. They visit the unmasked cells
    # one by one in cell order, so cells computed in place equal a re-prefill's bit for bit; a row
    # still depends on the order its cells sit in (a restore or a probe in another hole rounds
    # differently), which flash attention off does not show in the same tests.
    reference_kernels: bool = False


@dataclass
class _Gen:
    """A generation in progress."""

    session: Session
    stream: Stream
    params: SamplingParams
    sampler: Sampler
    stops: StopMatcher
    todo: list[int]  # prompt tokens still to decode
    todo_msg: list[int]  # their message ids
    reply_id: int
    mode: str  # "chat" or "text"
    history: list[dict]  # template history before the reply
    rollback: dict
    rollback_first_msg: int = -1  # the turn's first new message: protected from auto-roll
    phase: str = PREFILL
    next_token: int = -1
    tokens: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )
    usage: Usage = field(default_factory=Usage)
    t_start: float = field(default_factory=time.perf_counter)
    t_first: float = 0.0
    notices: list[dict] = field(default_factory=list)


class Core:
    def __init__(self, config: EngineConfig):
        self.config = config
        ref = resolve(config.model)
        self.backend = backend()
        n_gpu_layers = config.n_gpu_layers
        if n_gpu_layers is None:
            n_gpu_layers = 999 if self.backend != "cpu" else 0
        self.n_gpu_layers = n_gpu_layers
        self.model = Model(ref.path, n_gpu_layers=n_gpu_layers)
        self.model_name = ref.name
        info = self.model.info()
        if config.n_ctx < 16:
            raise InvalidRequest(f"n_ctx {config.n_ctx} is too small (minimum 16)")
        if config.n_ctx > info.n_ctx_train:
            raise InvalidRequest(
                f"n_ctx {config.n_ctx} is above what {ref.name} was trained for ({info.n_ctx_train})"
            )
        if not 1 <= config.max_sessions <= 63:
            raise InvalidRequest("max_sessions must be between 1 and 63")
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
        self.ctx = self._new_context(config)
        self.mem = Memory(self.ctx)
        self.batch = Batch(self.n_batch)
        self.template = ChatTemplate(
            self.model.chat_template,
            bos_token=self.model.token_text(self.model.bos) if self.model.bos >= 0 else "",
            eos_token=self.model.token_text(self.model.eos) if self.model.eos >= 0 else "",
        )
        self.sessions: dict[str, Session] = {}
        self.evicted: dict[str, Path] = {}  # sessions on disk, restored on first use
        self.sessions_dir = Path(config.sessions_dir) if config.sessions_dir else subdir("sessions")
        self.sessions_dir.mkdir(parents=True, exist_ok=True)
        self.type_k = self.type_v = "f16"  # llama.cpp's default KV types; recorded in session files
        self.free_seqs = list(range(self.scratch_seq))
        self.gens: list[_Gen] = []
        self.jobs: list[Job] = []  # long work advancing a chunk at a time between decode steps
        self.job_seq_owner: Job | None = None
        self.ready: list = []  # deferred work whose session became free
        self._counter = 0
        self._last_big = False
        if config.persist:
            persist.scan(self)

    def _new_context(self, config: EngineConfig):
        params = lib.llama_context_default_params()
        params.n_ctx = self.n_cells
        params.n_batch = self.n_batch
        params.n_ubatch = self.n_batch
        params.n_seq_max = self.n_seq_max
        params.kv_unified = True  # cells can move between sequences (seq_cp, forks, blocks)
        params.no_perf = True
        # Measured on CPU: with flash attention (llama.cpp's default) a row's result depends on
        # where its cells sit in the cache (a re-prefill or a restore into other cells moved
        # logits by up to 0.45), but not on which other sessions share its batch (under the
        # small-batch rule below). Without it, a restore or a re-prefill reproduces the cache bit
        # for bit, but a decode batch holding several sessions rounds differently from a solo
        # one. Serving keeps the default; fidelity measurements and exact restores turn it off.
        if config.flash_attn is not None:
            params.flash_attn_type = 1 if config.flash_attn else 0
        if config.exact and config.reference_kernels:
            raise InvalidRequest("exact (flash attention off) and reference_kernels exclude each other")
        if config.reference_kernels and not (native.available() and self.backend == "cpu"):
            raise InvalidRequest("reference kernels need kvside's native patch on a CPU build")
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
        for g in list(self.gens):
            self._fail(g, closed)
        self.stop_jobs(closed)
        waiting = self.ready + [item for s in self.sessions.values() for item in s.backlog]
        self.ready = []
        for s in self.sessions.values():
            s.backlog.clear()
        for _fn, _session, future in waiting:
            if future.set_running_or_notify_cancel():
                future.set_exception(closed)
        failures = []
        if self.config.persist and self.ctx:
            for s in list(self.sessions.values()):
                if s.temporary or not any(m.role != "system" for m in s.messages):
                    continue  # nothing was said in it: nothing to keep
                try:
                    persist.save(self, s, persist.session_path(self, s.name))
                except KvsideError as exc:
                    failures.append(f"session {s.name} was not saved: {exc.message}")
                    log.error("session %s was not saved: %s", s.name, exc.message)
        self.close_failures = failures
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
        if name in self.evicted:
            return persist.bring_back(self, name)
        raise SessionNotFound(f"no session named {name!r}")

    def free_name(self, prefix: str = "s") -> str:
        """A session name that no resident session, known saved session or file in the sessions
        folder has (a file there may belong to a run that did not persist)."""
        while True:
            self._counter += 1
            name = f"{prefix}{self._counter}"
            if name not in self.sessions and name not in self.evicted and \
                    not (self.sessions_dir / f"{name}{persist.SUFFIX}").exists():
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

    def new_session(self, name: str | None = None, system: str | None = None,
                    keep: set[str] = frozenset()) -> Session:
        """A new empty session (with the system prompt decoded). `keep`: sessions that must stay
        resident to make room (a fork's parent). On failure nothing is registered or held."""
        name = check_name(name) if name is not None else self.free_name()
        if name in self.sessions or name in self.evicted:
            raise InvalidRequest(f"session {name!r} already exists")
        seq = self.take_seq(keep)
        session = Session(name=name, seq=seq)
        system = system if system is not None else self.config.default_system
        try:
            if system:
                session.messages.append(Message(0, "system", system, pinned=True))
                session.closing = ""
                self._prefill_now(session, self._chat_pieces(session, session.messages[:1], generation=False, history=[]))
        except BaseException:
            self.give_seq(seq)
            raise
        self.sessions[name] = session
        return session

    def delete_session(self, name: str, forget_file: bool = False) -> None:
        if name not in self.sessions and name in self.evicted:
            path = self.evicted.pop(name)
            if forget_file:
                path.unlink(missing_ok=True)
            return
        session = self.get(name)
        if session.busy:
            raise SessionBusy(f"session {name!r} is generating; cancel it first")
        self.give_seq(session.seq)
        del self.sessions[name]
        if forget_file:
            persist.session_path(self, name).unlink(missing_ok=True)

    def used_cells(self) -> int:
        return sum(len(s.ledger) for s in self.sessions.values())

    def check(self, name: str) -> dict:
        """Compare the ledger with the cache; raises AssertionError on a mismatch."""
        s = self.get(name)
        lo, hi = self.mem.pos_min(s.seq), self.mem.pos_max(s.seq)
        if len(s.ledger) == 0:
            assert lo == -1 and hi == -1, f"ledger empty but cache holds {lo}..{hi}"
        else:
            assert lo == s.ledger.pos[0], f"cache starts at {lo}, ledger at {s.ledger.pos[0]}"
            assert hi == s.ledger.pos[-1], f"cache ends at {hi}, ledger at {s.ledger.pos[-1]}"
        return {"pos_min": lo, "pos_max": hi, "n_cells": len(s.ledger)}

    # -- building prompts -----------------------------------------------------------------------
    def _chat_pieces(
        self, s: Session, new: list[Message], *, generation: bool, history: list[dict] | None = None
    ) -> list[tuple[int, list[int]]]:
        """Token pieces (message id, tokens) that append `new` (and the reply's generation prompt)
        to what the session's cache holds."""
        hist = s.template_history() if history is None else list(history)
        texts: list[tuple[int, str]] = []
        if s.closing:
            texts.append((s.pending_msg, s.closing))
        for m in new:
            seg = self.template.delta(hist, [m.as_template()], add_generation_prompt=False)
            if seg is None:
                raise TemplateError("this model's chat template rewrites earlier turns; kvside needs one that appends")
            texts.append((m.id, seg))
            hist.append(m.as_template())
        pieces: list[tuple[int, list[int]]] = []
        if s.pending:
            pieces.append((s.pending_msg, list(s.pending)))
        fresh = len(s.ledger) == 0 and not s.pending
        for msg_id, text in texts:
            if not text:
                continue
            tokens = self.model.tokenize(text, add_special=False, parse_special=True)
            if fresh and self.model.add_bos and not (tokens and tokens[0] == self.model.bos):
                tokens.insert(0, self.model.bos)
            fresh = False
            pieces.append((msg_id, tokens))
        if generation:
            gen = self.template.delta(hist, [], add_generation_prompt=True) or ""
            pieces.append((-1, self.model.tokenize(gen, add_special=False, parse_special=True) if gen else []))
        return pieces

    def _text_pieces(self, s: Session, msg_id: int, text: str) -> list[tuple[int, list[int]]]:
        pieces: list[tuple[int, list[int]]] = []
        if s.pending and not self.model.is_eog(s.pending[0]):
            pieces.append((s.pending_msg, list(s.pending)))
        fresh = len(s.ledger) == 0 and not pieces
        pieces.append((msg_id, self.model.tokenize(text, add_special=fresh, parse_special=False)))
        return pieces

    def _room_check(self, s: Session, n_new: int, max_tokens: int) -> None:
        if s.ledger.next_pos + n_new >= self.n_ctx:
            raise ContextFull(
                f"the prompt needs {n_new} more tokens but session {s.name!r} has "
                f"{self.n_ctx - s.ledger.next_pos} of {self.n_ctx} positions left"
            )
        if self.used_cells() + n_new + 1 > self.n_cells:
            raise CacheFull(f"the shared KV cache is full ({self.used_cells()} of {self.n_cells} cells)")

    def _clear_pending(self, s: Session) -> None:
        s.pending, s.pending_msg, s.closing = [], -1, ""

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
            rc = lib.llama_decode(self.ctx, self.batch.raw)
            if rc != 0:
                self.mem.rm(seq, start, -1)
                raise _decode_error(rc)
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
            rc = lib.llama_decode(self.ctx, self.batch.raw)
            if rc != 0:
                self.mem.rm(seq, start, -1)
                raise _decode_error(rc)

    def settle(self) -> None:
        """Apply a pending K-shift now, by decoding one token into the scratch sequence."""
        if not self.mem.shift_pending:
            return
        scratch = self.scratch_seq
        pos = self.mem.pos_max(scratch) + 1
        self.decode_now(scratch, [max(self.model.bos, 0)], pos, logits="none")
        self.mem.rm(scratch, pos, -1)
        self.mem.shift_pending = False

    def seq_state(self, seq: int):
        """The sequence's state (llama_state_seq_get_data) with every shift applied to its keys."""
        self.settle()
        return get_seq_state(self.ctx, seq)

    def _prefill_now(self, s: Session, pieces: list[tuple[int, list[int]]]) -> None:
        tokens = [t for _, toks in pieces for t in toks]
        self._room_check(s, len(tokens), 0)
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
        out = self.decode_now(s.seq, tokens, start, logits="all" if all_logits else "last")
        self.mem.rm(s.seq, start, -1)
        assert out is not None
        return out

    def greedy(self, name: str, first: list[int], n: int) -> list[int]:
        """The greedy continuation after feeding `first`; the cache is left as it was."""
        s = self.get(name)
        start = s.ledger.next_pos
        out: list[int] = []
        try:
            logits = self.decode_now(s.seq, first, start, logits="last")
            pos = start + len(first)
            while len(out) < n and pos < self.n_ctx:
                out.append(int(np.argmax(logits)))
                logits = self.decode_now(s.seq, [out[-1]], pos, logits="last")
                pos += 1
        finally:
            self.mem.rm(s.seq, start, -1)
        return out

    # -- generations ----------------------------------------------------------------------------
    def start_chat(self, name: str, messages: list[dict], params: SamplingParams, stream: Stream) -> None:
        s = self.get(name)
        new = []
        next_id = s.next_message_id()
        for i, m in enumerate(messages):
            role, content = m.get("role"), m.get("content")
            if role not in ("system", "user", "assistant", "tool") or not isinstance(content, str):
                raise InvalidRequest("each message needs a role (system/user/assistant/tool) and string content")
            new.append(Message(next_id + i, role, content, kind="tool" if role == "tool" else "chat"))
        if not new:
            raise InvalidRequest("no messages to send")
        if not any(m.content.strip() for m in new):
            raise InvalidRequest("the message is empty")
        if not s.messages and new[0].role == "system":
            new[0].pinned = True  # the system prompt is never rolled away
        history = s.template_history() + [m.as_template() for m in new]
        pieces = self._chat_pieces(s, new, generation=True)
        reply_id = next_id + len(new)
        pieces[-1] = (reply_id, pieces[-1][1])
        self._start(s, pieces, params, stream, reply_id, "chat", history, new)

    def start_text(self, name: str, text: str, params: SamplingParams, stream: Stream) -> None:
        s = self.get(name)
        if not text:
            raise InvalidRequest("the prompt is empty")
        msg_id = s.next_message_id()
        new = [Message(msg_id, "user", text, kind="text")]
        pieces = self._text_pieces(s, msg_id, text)
        self._start(s, pieces, params, stream, msg_id + 1, "text", [], new)

    def start_tokens(self, name: str, tokens: list[int], params: SamplingParams, stream: Stream) -> None:
        """Continue a session from raw tokens (fill-in-the-middle prompts carry special tokens)."""
        s = self.get(name)
        if not tokens:
            raise InvalidRequest("the prompt is empty")
        msg_id = s.next_message_id()
        new = [Message(msg_id, "user", "", kind="text")]
        pieces = [(msg_id, list(tokens))]
        self._start(s, pieces, params, stream, msg_id + 1, "text", [], new)

    def _start(self, s, pieces, params, stream, reply_id, mode, history, new) -> None:
        todo = [t for _, toks in pieces for t in toks]
        todo_msg = [m for m, toks in pieces for _ in toks]
        notices = []
        rolled = edits.auto_roll(self, s, len(todo) + 1, protect={m.id for m in new})
        if rolled:
            notices.append(self._notice(stream, rolled))
        self._room_check(s, len(todo), params.max_tokens)
        rollback = {
            "start": s.ledger.next_pos,
            "n_messages": len(s.messages),
            "pending": list(s.pending),
            "pending_msg": s.pending_msg,
            "closing": s.closing,
        }
        s.messages.extend(new)
        self._clear_pending(s)
        sampler = Sampler(params, s.ledger.tok + todo, self.model.n_vocab)
        gen = _Gen(s, stream, params, sampler, StopMatcher(params.stop), todo, todo_msg, reply_id, mode, history, rollback)
        gen.rollback_first_msg = new[0].id if new else -1
        gen.notices.extend(notices)
        gen.usage.cached_tokens = len(s.ledger)
        gen.usage.prompt_tokens = len(s.ledger) + len(todo)
        s.busy = True
        s.last_used = time.time()
        self.gens.append(gen)

    @property
    def active(self) -> bool:
        return bool(self.gens) or bool(self.jobs)

    # -- jobs -----------------------------------------------------------------------------------
    def start_job(self, steps, future, session: str | None, needs_job_seq: bool = False) -> None:
        """Run the generator `steps` a chunk at a time between decode steps; its return value (or
        exception) resolves `future`. Its session, if any, is busy meanwhile: other work for it
        waits in its backlog, and binding and eviction pass it by."""
        s = self.sessions.get(session) if session else None
        if s is not None:
            s.busy = True
        self.jobs.append(Job(steps, future, s, needs_job_seq))

    def advance_job(self) -> None:
        """One chunk of the first job that may run (jobs that need the job sequence take turns)."""
        for job in list(self.jobs):
            if job.needs_job_seq and self.job_seq_owner not in (None, job):
                continue
            if job.needs_job_seq:
                self.job_seq_owner = job
            self.jobs.remove(job)
            try:
                next(job.steps)
            except StopIteration as done:
                self._end_job(job)
                job.future.set_result(done.value)
            except BaseException as exc:  # the job's own error, for its caller
                self._end_job(job)
                job.future.set_exception(exc)
            else:
                self.jobs.append(job)  # round robin among jobs
            return

    def _end_job(self, job: Job) -> None:
        if self.job_seq_owner is job:
            self.job_seq_owner = None
            self.mem.clear_seq(self.job_seq)
        s = job.session
        if s is not None:
            s.busy = False
            s.last_used = time.time()
            self.ready.extend(s.backlog)
            s.backlog.clear()

    def stop_jobs(self, error: KvsideError) -> None:
        """Close every job (their snapshots roll their sessions back) and fail their callers."""
        for job in list(self.jobs):
            self.jobs.remove(job)
            try:
                job.steps.close()
            except BaseException as exc:  # a job that cannot even stop cleanly
                log.error("a job failed while stopping: %s", exc)
            self._end_job(job)
            job.future.set_exception(error)  # running since its task was dispatched

    def step(self) -> None:
        """One llama_decode over every active generation, then one chunk of a job."""
        if self.gens:
            self._step_generations()
        if self.jobs:
            self.advance_job()

    def _step_generations(self) -> None:
        for g in list(self.gens):
            if g.stream.cancelled:
                self._finish(g, "cancelled")
        if not self.gens:
            return
        self.batch.clear()
        slots = self._plan_big() if not self._last_big else None
        self._last_big = bool(slots)
        if not slots:
            slots = self._plan_small()
        if not slots:  # only big prefills are waiting
            slots = self._plan_big()
            self._last_big = True
        if not slots:
            for g in [g for g in self.gens if g.phase == PREFILL and not g.todo]:
                self._fail(g, InvalidRequest("nothing to decode"))
            return
        rc = lib.llama_decode(self.ctx, self.batch.raw)
        if rc != 0:
            error = _decode_error(rc)
            for g, _, _, _ in slots:
                self.mem.rm(g.session.seq, g.session.ledger.next_pos, -1)
                self._fail(g, error)
            return
        for g, toks, msgs, idx in slots:
            for tok, msg in _runs(toks, msgs):
                g.session.ledger.append(tok, msg)
            if idx >= 0:
                if g.phase == PREFILL:
                    g.phase = DECODE
                    g.t_first = time.perf_counter()
                self._on_token(g, g.sampler.sample(self.ctx, idx))

    # llama.cpp's CPU matmul switches kernels at 64 tokens per ubatch (measured): batches below
    # that give bit-identical rows whatever else they hold, batches above differ in rounding. So
    # a prefill chunk of 64 tokens or more is decoded alone, and small work (decode steps, short
    # prompt tails) is packed only while the batch stays under 64: a session's output then does
    # not depend on what other sessions are doing.
    def _plan_big(self) -> list:
        for g in self.gens:
            if g.phase == PREFILL and len(g.todo) >= SMALL_BATCH:
                self.gens.remove(g)
                self.gens.append(g)  # round-robin among long prompts
                return [self._add_prefill(g, min(len(g.todo), self.n_batch))]
        return []

    def _plan_small(self) -> list:
        slots = []
        for g in self.gens:
            if g.phase == DECODE and self.batch.n + 1 < SMALL_BATCH:
                idx = self.batch.add(g.next_token, g.session.ledger.next_pos, g.session.seq, True)
                slots.append((g, [g.next_token], [g.reply_id], idx))
        for g in self.gens:
            if g.phase == PREFILL and 0 < len(g.todo) and self.batch.n + len(g.todo) < SMALL_BATCH:
                slots.append(self._add_prefill(g, len(g.todo)))
        return slots

    def _add_prefill(self, g: _Gen, n: int):
        pos0 = g.session.ledger.next_pos
        idx = -1
        for i in range(n):
            last = i == n - 1 and n == len(g.todo)
            j = self.batch.add(g.todo[i], pos0 + i, g.session.seq, last)
            idx = j if last else idx
        slot = (g, g.todo[:n], g.todo_msg[:n], idx)
        del g.todo[:n], g.todo_msg[:n]
        return slot

    def _on_token(self, g: _Gen, token: int) -> None:
        g.tokens.append(token)
        g.usage.completion_tokens = len(g.tokens)
        if self.model.is_eog(token) and not g.params.ignore_eos:
            return self._finish(g, "stop")
        text = g.decoder.decode(self.model.piece(token))
        emit, hit = g.stops.feed(text)
        if emit:
            g.text.append(emit)
            g.stream.put(Event("text", emit))
        if hit:
            return self._finish(g, "stop", stop_hit=True)
        if len(g.tokens) >= g.params.max_tokens:
            return self._finish(g, "length")
        if g.session.ledger.next_pos + 1 >= self.n_ctx:
            protect = set(range(g.rollback_first_msg, g.reply_id + 1))
            try:
                rolled = edits.auto_roll(self, g.session, 1 + self.n_ctx // 8, protect=protect)
            except KvsideError as exc:
                # the reply so far stays in the session; the client learns why it stopped
                return self._finish(g, "error", error=EditError(f"the window is full and rolling it failed: {exc.message}"))
            if not rolled or g.session.ledger.next_pos + 1 >= self.n_ctx:
                return self._finish(g, "length")
            g.notices.append(self._notice(g.stream, rolled))
        g.next_token = token

    def _notice(self, stream: Stream, report: dict) -> dict:
        notice = {"kind": "roll", **report}
        if report.get("strategy") == "close_gaps":
            text = f"context full: closed {report['gaps_closed']} holes left by masks"
        else:
            text = f"context full: rolled {report['dropped']} tokens ({report['strategy']})"
        stream.put(Event("notice", text=text, data=notice))
        return notice

    def _finish(self, g: _Gen, reason: str, stop_hit: bool = False, error: KvsideError | None = None) -> None:
        """End g: its reply becomes a message of the session, and the stream gets the completion
        (or `error`, after the text so far)."""
        s = g.session
        if reason == "cancelled" and g.phase == PREFILL:
            self._undo(g)
            completion = Completion(s.name, "", [], "cancelled", g.usage, t_total_s=time.perf_counter() - g.t_start)
            self._release(g)
            g.stream.finish(completion)
            return
        if not stop_hit:
            tail = g.decoder.decode(b"", final=True) + g.stops.flush()
            if tail:
                g.text.append(tail)
                g.stream.put(Event("text", tail))
        text = "".join(g.text)
        s.pending = g.tokens[-1:]
        s.pending_msg = g.reply_id
        if g.mode == "chat":
            reply = Message(g.reply_id, "assistant", text)
            s.messages.append(reply)
            s.closing, keep_eog = self._closing(g.history, reply, s.pending)
            if s.pending and self.model.is_eog(s.pending[0]) and not keep_eog:
                s.pending = []
        else:
            s.messages.append(Message(g.reply_id, "assistant", text, kind="text"))
            if s.pending and self.model.is_eog(s.pending[0]):
                s.pending = []
        now = time.perf_counter()
        n_dec = max(len(g.tokens) - 1, 0)
        completion = Completion(
            session=s.name,
            text=text,
            tokens=list(g.tokens),
            finish_reason=reason,
            usage=g.usage,
            t_prefill_s=(g.t_first or now) - g.t_start,
            t_total_s=now - g.t_start,
            decode_tok_s=n_dec / (now - g.t_first) if g.t_first and n_dec and now > g.t_first else 0.0,
            notices=g.notices,
            params=vars(g.params),
        )
        self._release(g)
        if error is not None:
            g.stream.fail(error)
        else:
            g.stream.finish(completion)

    def _closing(self, history: list[dict], reply: Message, pending: list[int]) -> tuple[str, bool]:
        """Template text that closes the reply after what the model wrote, and whether the EOG
        token already sampled stands for its first part (then it is decoded, not re-tokenized)."""
        before = self.template.render(history, add_generation_prompt=True)
        after = self.template.render(history + [reply.as_template()], add_generation_prompt=False)
        body = reply.content
        if after.startswith(before + body):
            closing = after[len(before) + len(body) :]
        else:
            stripped = body.strip()
            j = after.rfind(stripped) if stripped else -1
            closing = after[j + len(stripped) :] if j >= len(before) else ""
        eog = pending and self.model.is_eog(pending[0])
        if eog:
            eog_text = self.model.token_text(pending[0])
            if closing.startswith(eog_text):
                return closing[len(eog_text) :], True
        return closing, False

    def fail_all(self, error: KvsideError) -> None:
        """End every generation with `error`; their sessions are rebuilt from their ledgers, so
        none is left between states."""
        for g in list(self.gens):
            if g in self.gens:
                self.gens.remove(g)
            g.sampler.close()
            g.session.busy = False
            try:
                edits.reprefill(self, g.session)
            except KvsideError:
                pass  # reprefill cleared the session's cache and ledger; it starts empty
            self.ready.extend(g.session.backlog)
            g.session.backlog.clear()
            g.stream.fail(error)

    def _undo(self, g: _Gen) -> None:
        s, rb = g.session, g.rollback
        self.mem.rm(s.seq, rb["start"], -1)
        s.ledger.truncate(rb["start"])
        del s.messages[rb["n_messages"] :]
        s.pending, s.pending_msg, s.closing = rb["pending"], rb["pending_msg"], rb["closing"]

    def _fail(self, g: _Gen, error: KvsideError) -> None:
        """End g with an error. A prompt not fully read is undone; a reply already under way is
        kept as far as it got, so the ledger and the messages still agree."""
        if g.phase == PREFILL:
            self._undo(g)
            self._release(g)
            g.stream.fail(error)
        else:
            self._finish(g, "error", error=error)

    def _release(self, g: _Gen) -> None:
        g.sampler.close()
        if g in self.gens:
            self.gens.remove(g)
        s = g.session
        s.busy = False
        s.last_used = time.time()
        self.ready.extend(s.backlog)
        s.backlog.clear()
        if s.temporary and s.name in self.sessions and not self.ready_for(s.name):
            self.delete_session(s.name, forget_file=True)

    def ready_for(self, name: str) -> bool:
        """Whether work for session `name` waits in the ready list."""
        return any(item[1] == name for item in self.ready)


def _runs(tokens: list[int], msgs: list[int]):
    """Group consecutive tokens by message id."""
    start = 0
    for i in range(1, len(tokens) + 1):
        if i == len(tokens) or msgs[i] != msgs[start]:
            yield tokens[start:i], msgs[start]
            start = i


def _logits_row(ctx, index: int, n_vocab: int) -> np.ndarray:
    ptr = lib.llama_get_logits_ith(ctx, index)
    return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(n_vocab,)).copy()


def _decode_error(rc: int) -> KvsideError:
    if rc == 1:
        return CacheFull("no free cells in the KV cache for this batch")
    if rc == 2:
        return DecodeError("decoding was aborted")
    return DecodeError(f"llama_decode failed ({rc}): {recent_log(2)}")
