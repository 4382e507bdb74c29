"""Saving and restoring sessions (engine thread), and keeping only N of them resident: the least
recently used idle session goes to disk and comes back, exactly, when it is next asked for."""

from __future__ import annotations

import time
from pathlib import Path

from kvside import sessionfile
from kvside.engine.edits import Strategy
from kvside.engine.ledger import Ledger
from kvside.engine.sampling import SamplingParams
from kvside.engine.session import Message, Session, check_name
from kvside.engine.state import set_seq_state
from kvside.errors import CacheFull, InvalidRequest, KvsideError, SessionBusy
from kvside.sessionfile import SessionFileError

SUFFIX = ".kvs"


def header_for(core, s: Session) -> dict:
    info = core.model.info()
    return {
        "name": s.name,
        "model_fingerprint": core.model.fingerprint,
        "model_name": core.model_name,
        "n_ctx": core.n_ctx,
        "type_k": core.type_k,
        "type_v": core.type_v,
        "rope": {"type": info.rope_type, "freq_base": info.rope_freq_base},
        "n_cells": len(s.ledger),
        "ledger": s.ledger.to_dict(),
        "messages": [m.to_dict() for m in s.messages],
        "pending": s.pending,
        "pending_msg": s.pending_msg,
        "closing": s.closing,
        "defaults": vars(s.defaults),
        "roll_strategy": s.roll_strategy,
        "edit_log": s.edit_log,
        "created": s.created,
        "last_used": s.last_used,
    }


def save(core, s: Session, path: Path) -> dict:
    if s.busy:
        raise SessionBusy(f"session {s.name!r} is generating")
    t0 = time.perf_counter()
    state = core.seq_state(s.seq)
    size = sessionfile.write(path, header_for(core, s), state)
    dt = time.perf_counter() - t0
    return {"session": s.name, "path": str(path), "bytes": size, "state_bytes": len(state), "t_save_s": dt}


def check_compatible(core, header: dict, name: str) -> None:
    """Everything a restore needs from the header, checked before the cache is touched."""
    if header.get("model_fingerprint") != core.model.fingerprint:
        raise SessionFileError(
            f"{name} was saved with another model ({header.get('model_name', '?')}); "
            f"this engine runs {core.model_name}"
        )
    if header.get("type_k") != core.type_k or header.get("type_v") != core.type_v:
        raise SessionFileError(f"{name} uses KV types {header.get('type_k')}/{header.get('type_v')}, "
                               f"this engine {core.type_k}/{core.type_v}")
    try:
        ledger = Ledger.from_dict(header["ledger"])
        [Message(**m) for m in header["messages"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise SessionFileError(f"{name} has a damaged ledger: {exc}") from None
    if ledger.next_pos > core.n_ctx:
        raise SessionFileError(f"{name} holds positions up to {ledger.next_pos}; this engine's n_ctx is {core.n_ctx}")
    if header.get("n_cells") != len(ledger):
        raise SessionFileError(f"{name}: header and ledger disagree on the number of cells")


def restore(core, path: Path, name: str | None = None) -> Session:
    """Load a session file into a free sequence. On any failure the cache and the file are as before."""
    path = Path(path)
    sf = sessionfile.read_header(path, verify=True)
    header = sf.header
    name = check_name(name or header.get("name") or path.stem)
    if name in core.sessions:
        raise InvalidRequest(f"session {name!r} already exists")
    check_compatible(core, header, path.name)
    if len(core.sessions) >= core.n_seq_max - 1:
        make_room(core)
    state = sessionfile.read_state(sf)
    s = core.new_session(name)
    try:
        set_seq_state(core.ctx, s.seq, state)
        ledger = Ledger.from_dict(header["ledger"])
        lo, hi = core.mem.pos_min(s.seq), core.mem.pos_max(s.seq)
        want = (ledger.pos[0], ledger.pos[-1]) if len(ledger) else (-1, -1)
        if (lo, hi) != want:
            raise SessionFileError(f"{path.name}: restored cells span {lo}..{hi}, the ledger says {want[0]}..{want[1]}")
    except KvsideError:
        core.delete_session(name)
        raise
    s.ledger = ledger
    s.messages = [Message(**m) for m in header["messages"]]
    s.pending = list(header.get("pending", []))
    s.pending_msg = header.get("pending_msg", -1)
    s.closing = header.get("closing", "")
    s.defaults = SamplingParams(**header.get("defaults", {}))
    s.edit_log = list(header.get("edit_log", []))
    s.roll_strategy = header.get("roll_strategy", "shift")
    try:
        Strategy.parse(s.roll_strategy)
    except InvalidRequest as exc:  # saved with the native patch, restored without it
        s.log("strategy", strategy="shift", was=s.roll_strategy, reason=exc.message)
        s.roll_strategy = "shift"
    s.created = header.get("created", time.time())
    return s


# -- resident set ----------------------------------------------------------------------------------
def session_path(core, name: str) -> Path:
    return core.sessions_dir / f"{check_name(name)}{SUFFIX}"


def evict(core, s: Session) -> Path:
    path = session_path(core, s.name)
    save(core, s, path)
    core.delete_session(s.name)
    core.evicted[s.name] = path
    return path


def make_room(core) -> None:
    """Send the least recently used idle session to disk; CacheFull if every one is busy."""
    idle = [s for s in core.sessions.values() if not s.busy]
    if not idle:
        raise CacheFull(f"all {core.n_seq_max - 1} resident sessions are busy")
    evict(core, min(idle, key=lambda s: s.last_used))


def bring_back(core, name: str) -> Session:
    path = core.evicted.pop(name)
    try:
        return restore(core, path, name)
    except KvsideError:
        core.evicted[name] = path  # still on disk, still known
        raise


def scan(core) -> None:
    """Sessions saved by an earlier run become known (restored on first use)."""
    for path in sorted(core.sessions_dir.glob(f"*{SUFFIX}")):
        if path.stem not in core.sessions:
            core.evicted[path.stem] = path
