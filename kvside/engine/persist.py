"""Saving and restoring sessions (engine thread), and keeping only N of them resident: the least
recently used idle session goes to disk and comes back, exactly, when it is next asked for."""

from __future__ import annotations

import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from kvside import sessionfile
from kvside.engine import checkpoints
from kvside.engine.edits import Strategy
from kvside.engine.fleet import SessionElsewhere
from kvside.engine.jobs import finish
from kvside.engine.ledger import Ledger
from kvside.engine.sampling import SamplingParams
from kvside.engine.session import Message, Session, check_name
from kvside.engine.state import StateRejected, set_seq_state
from kvside.engine.toolcalls import check_tools
from kvside.errors import InvalidRequest, KvsideError, NoIdleSession, SessionBusy
from kvside.sessionfile import SessionFileError

SUFFIX = ".kvs"
UPLOAD_PREFIX = ".upload-"  # a session file a client is sending (kvside/server/app.py)


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
        "tools": s.tools,
        "prune_tools": s.prune_tools,
        "edit_log": s.edit_log,
        "created": s.created,
        "last_used": s.last_used,
    }


def save(core, s: Session, path: Path) -> dict:
    if s.busy:
        raise SessionBusy(f"session {s.name!r} is generating")
    if core.fleet is not None and Path(path) == session_path(core, s.name) and not core.fleet.still_holds(s.name):
        # this daemon was taken for dead (its heartbeat lapsed) and another opened the session:
        # its file is that daemon's now
        raise SessionElsewhere(f"session {s.name!r} was opened by another daemon meanwhile; not saved here")
    t0 = time.perf_counter()
    state = core.seq_state(s.seq)
    # a cache that cannot go back keeps its context checkpoints across a save: a session that went
    # to disk while idle still goes back to them instead of reading everything again
    records, blobs = checkpoints.for_file(s)
    size = sessionfile.write(path, dict(header_for(core, s), checkpoints=records), state, extra=blobs)
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
    except (KeyError, TypeError, ValueError) as exc:
        raise SessionFileError(f"{name} has a damaged ledger: {exc}") from None
    if ledger.next_pos > core.n_ctx:
        raise SessionFileError(f"{name} holds positions up to {ledger.next_pos}; this engine's n_ctx is {core.n_ctx}")
    if header.get("n_cells") != len(ledger):
        raise SessionFileError(f"{name}: header and ledger disagree on the number of cells")


def restore(core, path: Path, name: str | None = None) -> Session:
    """Load a session file into a free sequence. Check, then commit: the file is verified in full,
    its cells are loaded into the scratch sequence and checked against its ledger, and only then
    is a sequence taken (sending an idle session to disk if none is free) and the session
    registered. On any failure the cache, the sessions and the file are as before."""
    return finish(restore_steps(core, path, name))


def restore_steps(core, path: Path, name: str | None = None):
    """restore as a job: the file is read (and its checksum checked) a chunk at a time."""
    path = Path(path)
    sf = sessionfile.read_header(path, verify=False)
    name = check_name(name or sf.header.get("name") or path.stem)
    _check_free(core, name, path)
    if core.fleet is None:
        return (yield from _restore_claimed(core, sf, path, name))
    # a shared folder: no other daemon has it open from before the file is read (the header
    # read above is read again) until it goes back to disk
    core.fleet.claim(name)
    try:
        sf = sessionfile.read_header(path, verify=False)
        return (yield from _restore_claimed(core, sf, path, name))
    except BaseException:
        if name not in core.sessions:
            core.let_go(name)
        raise


def _restore_claimed(core, sf, path: Path, name: str):
    header = sf.header
    check_compatible(core, header, path.name)
    s = session_from_header(header, name, path.name)
    if any(not 0 <= t < core.model.n_vocab for t in s.ledger.tok + s.pending):
        raise SessionFileError(f"{path.name} holds tokens this model does not have")
    state, extra = yield from sessionfile.read_all_steps(sf)  # checks the checksum over the whole file
    try:
        s.checkpoints = checkpoints.from_file(core, header.get("checkpoints", []), extra)
    except ValueError as exc:
        raise SessionFileError(f"{path.name}: {exc}") from None
    _check_free(core, name, path)  # other work ran while the file was read
    scratch = core.scratch_seq
    try:
        _load_into(core, scratch, state, s.ledger, path.name)
        s.seq = core.take_seq()
    except BaseException:
        core.mem.clear_seq(scratch)
        raise
    core.mem.cp(scratch, s.seq, -1, -1)  # hand the cells over; the scratch sequence lets go of them
    core.mem.clear_seq(scratch)
    core.evicted.pop(name, None)
    core.sessions[name] = s
    return s


def _check_free(core, name: str, path: Path) -> None:
    if name in core.sessions or (name in core.evicted and Path(core.evicted[name]).resolve() != path.resolve()):
        raise InvalidRequest(f"session {name!r} already exists")


def _calls_ok(calls) -> bool:
    if calls is None:
        return True
    return isinstance(calls, list) and all(
        isinstance(c, dict) and isinstance(c.get("function"), dict) and isinstance(c["function"].get("name"), str)
        and isinstance(c["function"].get("arguments"), str) for c in calls)


def session_from_header(header: dict, name: str, label: str) -> Session:
    """The session a file describes (no cells yet), every record checked for type."""
    try:
        s = Session(name=name, seq=-1, ledger=Ledger.from_dict(header["ledger"]),
                    messages=[Message(**m) for m in header["messages"]])
        if not all(type(m.id) is int and all(isinstance(v, str) for v in (m.role, m.content, m.state, m.kind))
                   and isinstance(m.reasoning, str) and (m.tool_call_id is None or isinstance(m.tool_call_id, str))
                   and _calls_ok(m.tool_calls) for m in s.messages):
            raise TypeError("a message has fields of the wrong type")
        s.pending = [int(t) for t in header.get("pending", [])]
        s.pending_msg = int(header.get("pending_msg", -1))
        s.closing = str(header.get("closing", ""))
        s.defaults = SamplingParams(**header.get("defaults", {})).validate()
        s.edit_log = [dict(e) for e in header.get("edit_log", [])]
        s.tools = check_tools(header.get("tools", [])) if header.get("tools") else []
        keep = header.get("prune_tools")
        if keep is not None and (type(keep) is not int or keep < 0):
            raise TypeError("prune_tools must be a count")
        s.prune_tools = keep
        s.created = float(header.get("created", time.time()))
        strategy = header.get("roll_strategy", "shift")
        if not isinstance(strategy, str):
            raise TypeError("roll_strategy must be a string")
    except (KeyError, TypeError, ValueError, AttributeError, KvsideError) as exc:
        raise SessionFileError(f"{label} has damaged session records: {exc}") from None
    try:
        s.roll_strategy = str(Strategy.parse(strategy))
    except InvalidRequest as exc:  # saved with the native patch, restored without it
        s.log("strategy", strategy="shift", was=strategy, reason=exc.message)
        s.roll_strategy = "shift"
    return s


def _load_into(core, seq: int, state, ledger: Ledger, label: str) -> None:
    """Load a state blob into seq and check its cells against the ledger. When the cache has no
    room for it, idle sessions go to disk one at a time until it fits."""
    while True:
        try:
            set_seq_state(core.ctx, seq, state)
            core.mem.state_restored(seq)
            break
        except StateRejected:
            if len(ledger) + core.used_cells() <= core.n_cells or not any(not s.busy for s in core.sessions.values()):
                raise SessionFileError(f"{label}: llama.cpp refused its cache state (damaged, or made by "
                                       "another build)") from None
            make_room(core)
    wrong = core.span_mismatch(seq, ledger.pos)
    if wrong is not None:
        raise SessionFileError(f"{label}: the restored cells do not match its ledger ({wrong})")


# -- resident set ----------------------------------------------------------------------------------
def session_path(core, name: str) -> Path:
    return core.sessions_dir / f"{check_name(name)}{SUFFIX}"


MAX_SAVED_AUTO = 8  # sessions made by request binding kept on disk, per resident session


class SavedAuto(NamedTuple):
    """What request binding remembers of a session it made that is on disk."""
    tools: str  # binding.tools_key of its tool definitions
    history: list[dict]  # binding.chat_history: the conversation it holds
    head: np.ndarray  # Ledger.head, int32: the tokens a new conversation could share
    n_cells: int  # what bringing it back reads


def remembered(s: Session) -> SavedAuto:
    from kvside.engine.binding import chat_history, tools_key

    return SavedAuto(tools_key(s.tools), chat_history(s), np.asarray(s.ledger.head(), dtype=np.int32), len(s.ledger))


def evict(core, s: Session) -> Path | None:
    if s.text_cache:  # a cache of a text prompt the client holds: nothing to keep
        core.delete_session(s.name)
        return None
    path = session_path(core, s.name)
    try:
        save(core, s, path)
    except SessionElsewhere:  # another daemon has it: this copy goes, unsaved
        core.delete_session(s.name)
        return None
    core.delete_session(s.name)
    core.evicted[s.name] = path
    if s.auto_bound:
        # what it holds stays in memory, so a request that continues it can still be matched
        # and brought back instead of prefilled; request binding's sessions are a cache (the
        # client holds the conversation), so beyond a bound the oldest ones are dropped
        core.auto_saved[s.name] = remembered(s)
        if core.fleet is not None:
            core.auto_stamps[s.name] = file_stamp(path)
        while len(core.auto_saved) > MAX_SAVED_AUTO * core.max_sessions:
            oldest = next(iter(core.auto_saved))
            core.auto_saved.pop(oldest)
            core.auto_stamps.pop(oldest, None)
            core.evicted.pop(oldest, path).unlink(missing_ok=True)
    return path


def file_stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def still_as_saved(core, name: str) -> bool:
    """Whether request binding's memory of saved session `name` still describes its file: in a
    shared folder another daemon may have continued the session since."""
    return core.fleet is None or core.auto_stamps.get(name) == file_stamp(session_path(core, name))


def make_room(core, keep: set[str] = frozenset()) -> None:
    """Send the least recently used idle session (not one in `keep`) to disk; NoIdleSession if
    there is none."""
    idle = [s for s in core.sessions.values() if not s.busy and s.name not in keep]
    if not idle:
        raise NoIdleSession(f"all {core.max_sessions} resident sessions are busy")
    evict(core, min(idle, key=lambda s: s.last_used))


def bring_back(core, name: str) -> Session:
    path = core.evicted.pop(name)
    t0 = time.perf_counter()
    try:
        s = restore(core, path, name)
    except KvsideError:
        core.evicted[name] = path  # still on disk, still known
        raise
    core.costs.record_restore(len(s.ledger), time.perf_counter() - t0)
    s.auto_bound = core.auto_saved.pop(name, None) is not None
    core.auto_stamps.pop(name, None)
    return s


def left_by_others(core, tools: str) -> dict[str, list[dict]]:
    """With a shared folder: what each request-bound session saved there by another daemon holds,
    for those no live daemon has open (a daemon that drained or died left them), made with these
    tools. Request binding matches a conversation that moved here against them, so it continues
    from the cache its old daemon left instead of being read again. Headers are read once per
    version of a file."""
    from kvside.engine.binding import AUTO_PREFIX, chat_history, tools_key

    found, index = {}, {}
    for path in core.sessions_dir.glob(f"{AUTO_PREFIX}*{SUFFIX}"):
        name = path.stem
        if name in core.sessions or name in core.auto_saved or core.fleet.owner_elsewhere(name) is not None:
            continue
        stamp = file_stamp(path)
        cached = core.folder_index.get(name)
        if cached is None or cached[0] != stamp:
            try:
                header = sessionfile.read_header(path, verify=False).header
                s = session_from_header(header, name, path.name)
                cached = (stamp, tools_key(s.tools), chat_history(s))
            except (KvsideError, OSError):
                cached = (stamp, None, [])
        index[name] = cached
        if cached[1] == tools:
            found[name] = cached[2]
    core.folder_index = index  # files gone since are forgotten
    return found


STALE_TMP_S = 3600.0  # in a shared folder, a temporary file this old is a dead daemon's


def scan(core) -> None:
    """Sessions saved by an earlier run become known (restored on first use). Temporary files a
    killed run left half-written are removed: the engine that persists owns its sessions folder,
    unless it shares it with other daemons, whose files being written are left alone."""
    now = time.time()
    for tmp in [*core.sessions_dir.glob(f".*{SUFFIX}.*.tmp"), *core.sessions_dir.glob(f"{UPLOAD_PREFIX}*{SUFFIX}")]:
        try:
            if core.fleet is None or now - tmp.stat().st_mtime > STALE_TMP_S:
                tmp.unlink(missing_ok=True)
        except OSError:
            pass
    known_again(core)
    if core.fleet is None:
        remember_auto(core)


def remember_auto(core) -> None:
    """Sessions that request binding made in an earlier run, matched again: what each file's
    header says it holds goes into request binding's memory, as if the session had just been sent
    to disk, so a client that comes back after a restart continues from the cache instead of
    being read again. Oldest first, so the bound drops the oldest; files it cannot read are left
    known by name only. (A shared folder has its own path: left_by_others.)"""
    from kvside.engine.binding import AUTO_PREFIX

    paths = sorted(core.sessions_dir.glob(f"{AUTO_PREFIX}*{SUFFIX}"), key=lambda p: file_stamp(p) or (0, 0))
    for path in paths[-MAX_SAVED_AUTO * core.max_sessions:]:
        name = path.stem
        if name in core.sessions or name.startswith("."):
            continue
        try:
            header = sessionfile.read_header(path, verify=False).header
            s = session_from_header(header, name, path.name)
        except (KvsideError, OSError):
            continue
        core.auto_saved[name] = remembered(s)


def known_again(core) -> None:
    """The sessions folder read again: its saved sessions are known; with a shared folder, those
    another daemon deleted are forgotten."""
    on_disk = {p.stem: p for p in sorted(core.sessions_dir.glob(f"*{SUFFIX}")) if not p.name.startswith(".")}
    for name, path in on_disk.items():
        if name not in core.sessions:
            core.evicted.setdefault(name, path)
    if core.fleet is not None:
        for name in [n for n in core.evicted if n not in on_disk]:
            core.evicted.pop(name)
            core.auto_saved.pop(name, None)
