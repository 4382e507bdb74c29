"""Keep a folder's documents compiled: a watchdog observer recompiles a file when it changes
(debounced) and forgets the blocks of a deleted file. The old blocks stay valid until the new ones
are complete (see kvside.engine.compose)."""

from __future__ import annotations

import threading
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from kvside.engine import compose
from kvside.errors import KvsideError

DEBOUNCE_S = 0.5


def documents_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: "DocWatcher"):
        self.watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            return
        paths = [event.src_path] + ([event.dest_path] if getattr(event, "dest_path", "") else [])
        for p in paths:
            self.watcher.touch(Path(p))


class DocWatcher:
    def __init__(self, engine, folder: Path, on_result=None):
        self.engine = engine
        self.folder = Path(folder).resolve()
        self.on_result = on_result or (lambda path, result, error: None)
        self.timers: dict[Path, threading.Timer] = {}
        self.lock = threading.Lock()
        self.observer = Observer()

    def start(self, initial: bool = True) -> "DocWatcher":
        if not self.folder.is_dir():
            raise KvsideError(f"--docs {self.folder} is not a folder")
        self.observer.schedule(_Handler(self), str(self.folder), recursive=True)
        self.observer.start()
        if initial:
            for path in documents_in(self.folder):
                self.touch(path, delay=0)
        return self

    def stop(self) -> None:
        self.observer.stop()
        self.observer.join(timeout=5)
        with self.lock:
            for t in self.timers.values():
                t.cancel()

    def touch(self, path: Path, delay: float = DEBOUNCE_S) -> None:
        """(Re)schedule work for path; events within the delay fold into one."""
        if any(part.startswith(".") for part in path.name.split("/")):
            return
        with self.lock:
            old = self.timers.pop(path, None)
            if old:
                old.cancel()
            timer = threading.Timer(delay, self._run, args=(path,))
            timer.daemon = True
            self.timers[path] = timer
            timer.start()

    def _run(self, path: Path) -> None:
        with self.lock:
            self.timers.pop(path, None)
        try:
            if path.exists():
                result = self.engine.compile(str(path))
            else:
                result = {"document": str(path), "forgotten": compose.forget_document(path)}
            self.on_result(path, result, None)
        except KvsideError as exc:
            self.on_result(path, None, exc)
