"""A local stand-in for a Hugging Face hub: the endpoints `huggingface_hub` uses to list a model
repository's files (with sizes and LFS checksums) and to download them (HEAD for the metadata, GET
with Range for resumable transfers). Tests point HF_ENDPOINT at it; nothing reaches the internet.

Faults to test against: `slow` (bytes per second, to kill a pull half-way), `corrupt` (a file whose
bytes do not match its published checksum), and a log of every request's Range header."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


@dataclass
class Repo:
    files: dict[str, bytes]
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    corrupt: set[str] = field(default_factory=set)  # served with one byte changed


class FakeHub:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.slow: int | None = None  # bytes per second for file bodies
        self.ranges: list[tuple[str, str | None]] = []  # (path, Range header) of every GET of a file
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub._serve(self, body=False)

            def do_GET(self):
                hub._serve(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- routes ---------------------------------------------------------------------------------
    def _serve(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlparse(h.path).path)
        parts = path.strip("/").split("/")
        try:
            if parts[:2] == ["api", "models"]:
                return self._info(h, parts[2:])
            if len(parts) >= 5 and parts[2] == "resolve":
                return self._file(h, "/".join(parts[:2]), parts[3], "/".join(parts[4:]), body)
        except (BrokenPipeError, ConnectionResetError):
            return
        self._error(h, 404, "EntryNotFound", "no such route")

    def _error(self, h, status: int, code: str, message: str, commit: str | None = None) -> None:
        data = json.dumps({"error": message}).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("X-Error-Code", code)
        h.send_header("X-Error-Message", message)
        if commit:
            h.send_header("X-Repo-Commit", commit)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)

    def _info(self, h, rest: list[str]) -> None:
        repo_id = "/".join(rest[:2])
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._error(h, 404, "RepoNotFound", f"Repository not found: {repo_id}")
        if len(rest) >= 4 and rest[2] == "revision" and rest[3] not in ("main", repo.commit):
            return self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {rest[3]}")
        siblings = [{"rfilename": name, "size": len(data), "blobId": hashlib.sha1(data).hexdigest(),
                     "lfs": {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}}
                    for name, data in repo.files.items()]
        data = json.dumps({"id": repo_id, "sha": repo.commit, "siblings": siblings, "private": False}).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _file(self, h, repo_id: str, revision: str, name: str, body: bool) -> None:
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._error(h, 404, "RepoNotFound", f"Repository not found: {repo_id}")
        if name not in repo.files:
            return self._error(h, 404, "EntryNotFound", f"{name} does not exist", repo.commit)
        data = repo.files[name]
        sha = hashlib.sha256(data).hexdigest()
        if name in repo.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        start = 0
        rng = h.headers.get("Range")
        if body:
            self.ranges.append((name, rng))
        if rng and rng.startswith("bytes="):
            start = int(rng[6:].split("-")[0] or 0)
        h.send_response(206 if start else 200)
        h.send_header("X-Repo-Commit", repo.commit)
        h.send_header("ETag", f'"{sha}"')
        h.send_header("X-Linked-Etag", f'"{sha}"')
        h.send_header("X-Linked-Size", str(len(repo.files[name])))
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("Content-Length", str(len(data) - start))
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.end_headers()
        if not body:
            return
        step = 4096
        for i in range(start, len(data), step):
            h.wfile.write(data[i:i + step])
            if self.slow:
                h.wfile.flush()
                time.sleep(step / self.slow)
