"""Sessions shared by several daemons through one folder (NFS, SMB, a synced folder): one owner
at a time, and a clean hand-over when another daemon is asked for a session.

The rule: a daemon holds a session's lease exactly while the session is resident in its engine.
A session on disk has no owner; any daemon may claim it and restore its file. Everything lives in
the sessions folder, so nothing but the folder is shared:

    .fleet/daemons/<daemon>   heartbeat: host, pid, wall time of the last beat
    .fleet/leases/<session>   the daemon that holds the session (created with O_EXCL)
    .fleet/wants/<session>    a daemon asking the holder to let go
    .fleet/journal/<daemon>   when this daemon took and let go of each session (for audits)

A lease is taken by creating its file exclusively, which NFSv3+ and SMB do atomically. Its holder
is alive while its heartbeat is fresh (within `ttl_s`; the hosts' clocks must agree to within a
few seconds, as NTP keeps them) and, on the same host, while its process exists, so a daemon
killed on this host frees its sessions at once and one killed elsewhere after `ttl_s`. A dead
holder's lease is broken by renaming it away (one breaker wins) and checking what was renamed.

Hand-over: the daemon asked for a session another one holds writes a want file and waits; the
holder's steward sees it, and the engine, after the session's current reply, saves the session
and evicts it, which releases the lease; the asker then claims it and restores the file."""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from pathlib import Path

from kvside.errors import KvsideError

log = logging.getLogger("kvside.fleet")

HANDOVER_S = 30.0  # how long a daemon waits for another to let go of a session


class SessionElsewhere(KvsideError):
    """Another live daemon holds the session and did not let go in time."""

    status = 409
    kind = "invalid_request_error"
    code = "session_elsewhere"


def _write_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: it exists
    return True


class Leases:
    """This daemon's view of the shared folder. Thread-safe: the engine thread claims and releases,
    the steward beats, the HTTP loop looks (through a thread)."""

    def __init__(self, folder: Path, ttl_s: float = 15.0, url: str = ""):
        self.root = Path(folder) / ".fleet"
        self.ttl_s = ttl_s
        self.host = socket.gethostname()
        self.me = f"{self.host}-{os.getpid()}-{secrets.token_hex(3)}"
        self.url = url
        self.held: set[str] = set()
        self._lock = threading.Lock()
        for sub in ("daemons", "leases", "wants", "journal"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.beat()

    # -- this daemon's heartbeat -------------------------------------------------------------
    def beat(self) -> None:
        _write_atomic(self.root / "daemons" / self.me,
                      {"daemon": self.me, "host": self.host, "pid": os.getpid(), "beat": time.time(), "url": self.url})

    def alive(self, daemon: str) -> bool:
        if daemon == self.me:
            return True
        info = _read(self.root / "daemons" / daemon)
        if info is None:
            return False  # it left cleanly (or never beat)
        if info.get("host") == self.host and not _pid_exists(int(info.get("pid", -1))):
            return False
        return time.time() - float(info.get("beat", 0)) <= self.ttl_s

    def daemons(self) -> list[dict]:
        rows = []
        for path in sorted((self.root / "daemons").iterdir()):
            info = _read(path)
            if info is not None and not path.name.startswith("."):
                rows.append(dict(info, alive=self.alive(path.name)))
        return rows

    # -- leases ---------------------------------------------------------------------------------
    def holder(self, name: str) -> str | None:
        info = _read(self.root / "leases" / name)
        return info.get("daemon") if info else None

    def owner_elsewhere(self, name: str) -> str | None:
        """The live daemon other than this one that holds `name`, if any."""
        holder = self.holder(name)
        return holder if holder is not None and holder != self.me and self.alive(holder) else None

    def claim(self, name: str) -> None:
        """Hold `name`, or raise SessionElsewhere. Holding it already is fine."""
        if not self.try_claim(name):
            raise SessionElsewhere(f"session {name!r} is open on another daemon ({self.holder(name)}); "
                                   "try again when it has let go")

    def try_claim(self, name: str) -> bool:
        path = self.root / "leases" / name
        with self._lock:
            for _ in range(3):
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    holder = self.holder(name)
                    if holder == self.me:
                        self.held.add(name)
                        return True
                    if holder is not None and self.alive(holder):
                        return False
                    self._break(path, holder)
                    continue
                with os.fdopen(fd, "w") as f:
                    f.write(json.dumps({"daemon": self.me, "since": time.time()}))
                self.held.add(name)
                self._journal("open", name)
                (self.root / "wants" / name).unlink(missing_ok=True)  # whoever asked got it
                return True
            return False

    def _break(self, path: Path, dead: str | None) -> None:
        """Take away a dead daemon's lease. Renaming is atomic, so of two breakers one gets the
        file; if what it got is not the dead one's lease (a third daemon claimed in between), it
        goes back where it was."""
        grave = path.with_name(f".{path.name}.{secrets.token_hex(4)}.broken")
        try:
            os.rename(path, grave)
        except FileNotFoundError:
            return
        info = _read(grave)
        if info is not None and info.get("daemon") != dead:
            try:
                os.link(grave, path)  # fails if a lease is there again: that one stands
            except FileExistsError:
                pass
        else:
            log.warning("lease of session %s broken: its daemon %s is gone", path.name, dead)
        grave.unlink(missing_ok=True)

    def _journal(self, what: str, name: str) -> None:
        try:
            with open(self.root / "journal" / self.me, "a") as f:
                f.write(f"{time.time():.6f} {what} {name}\n")
        except OSError as exc:
            log.warning("fleet journal: %s", exc)

    def still_holds(self, name: str) -> bool:
        """Whether this daemon's lease on `name` still stands (no one broke it)."""
        return self.holder(name) == self.me

    def release(self, name: str) -> None:
        with self._lock:
            if name not in self.held:
                return
            self.held.discard(name)
            path = self.root / "leases" / name
            self._journal("close", name)  # before the lease goes: no one else has it open before this line
            if self.holder(name) == self.me:
                path.unlink(missing_ok=True)

    # -- hand-over ------------------------------------------------------------------------------
    def ask(self, name: str) -> None:
        _write_atomic(self.root / "wants" / name, {"daemon": self.me, "at": time.time()})

    def wanted(self) -> list[str]:
        """Sessions this daemon holds that another daemon asked for."""
        with self._lock:
            held = set(self.held)
        names = []
        for name in held:
            info = _read(self.root / "wants" / name)
            # an asker waits HANDOVER_S at most: an older want is one it gave up on
            if info is not None and info.get("daemon") != self.me and time.time() - float(info.get("at", 0)) < 2 * HANDOVER_S:
                names.append(name)
        return names

    def withdraw(self, name: str) -> None:
        """Stop asking for `name` (the asker gave up waiting)."""
        path = self.root / "wants" / name
        info = _read(path)
        if info is not None and info.get("daemon") == self.me:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        """Let go of everything (the sessions were saved) and stop beating."""
        for name in list(self.held):
            self.release(name)
        (self.root / "daemons" / self.me).unlink(missing_ok=True)


class Steward(threading.Thread):
    """Beats for this daemon and hands over the sessions other daemons ask for: the engine saves
    and evicts each one after its current work."""

    def __init__(self, engine, leases: Leases, tick_s: float = 0.2):
        super().__init__(name="kvside-fleet", daemon=True)
        self.engine, self.leases, self.tick_s = engine, leases, tick_s
        self._stop = threading.Event()
        self._pending: set[str] = set()

    def run(self) -> None:
        last_beat = 0.0
        while not self._stop.wait(self.tick_s):
            try:
                if time.monotonic() - last_beat >= self.leases.ttl_s / 4:
                    self.leases.beat()
                    last_beat = time.monotonic()
                for name in self.leases.wanted():
                    if name not in self._pending:
                        self._hand_over(name)
            except KvsideError:
                return  # the engine is closing
            except Exception as exc:  # noqa: BLE001  (a folder gone for a moment, or a bug: the
                # heartbeat must go on, or other daemons take this one's sessions while it serves them)
                log.warning("fleet: %s: %s", type(exc).__name__, exc)

    def _hand_over(self, name: str) -> None:
        from kvside.engine import persist

        def let_go(core):
            s = core.sessions.get(name)
            if s is None:
                self.leases.release(name)
            else:
                persist.evict(core, s)
                log.info("session %s handed over", name)

        self._pending.add(name)
        future = self.engine.submit(let_go, session=name)
        future.add_done_callback(lambda f: self._pending.discard(name))

    def stop(self) -> None:
        self._stop.set()
