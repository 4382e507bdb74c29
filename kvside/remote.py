"""The CLI's way to a running daemon: when `kvside serve` runs (found by --connect URL, KVSIDE_URL,
or the default address answering /health), session commands act on the daemon's live sessions
through its endpoints instead of on files."""

from __future__ import annotations

import os
from pathlib import Path

import httpx

from kvside import sessionfile
from kvside.atomic import atomic_writer
from kvside.engine.persist import SUFFIX
from kvside.engine.session import check_name
from kvside.errors import KvsideError

DEFAULT_URL = "http://127.0.0.1:8077"


def find_daemon(url: str | None) -> str | None:
    """The daemon's base URL, or None when none runs (an explicit URL that does not answer is an error)."""
    explicit = url or os.environ.get("KVSIDE_URL")
    candidate = (explicit or DEFAULT_URL).rstrip("/")
    try:
        r = httpx.get(candidate + "/health", timeout=0.5 if not explicit else 5)
        if r.status_code == 200 and r.json().get("status") == "ok" and "model" in r.json():
            return candidate
    except (httpx.HTTPError, ValueError):
        pass
    if explicit:
        raise KvsideError(f"no kvside daemon answers at {candidate}")
    return None


class Daemon:
    def __init__(self, url: str, api_key: str | None = None):
        self.url = url
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url, headers=headers, timeout=300)

    def _call(self, method: str, path: str, **kw) -> dict:
        try:
            r = self.http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise KvsideError(f"daemon at {self.url}: {exc}") from None
        try:
            data = r.json()
        except ValueError:
            raise KvsideError(f"daemon at {self.url} answered HTTP {r.status_code}") from None
        if r.status_code >= 400:
            raise KvsideError((data.get("error") or {}).get("message", f"HTTP {r.status_code}"))
        return data

    def sessions(self) -> list[dict]:
        return self._call("GET", "/kvside/sessions")["sessions"]

    def show(self, name: str) -> dict:
        return self._call("GET", f"/kvside/sessions/{name}")

    def remove(self, name: str) -> dict:
        return self._call("DELETE", f"/kvside/sessions/{name}")

    def save(self, name: str, path: str | None) -> dict:
        """Save a live session: in the daemon's sessions folder, or (with `path`) into a file
        here, which the daemon never names: the bytes come over GET .../file."""
        if not path:
            out = self._call("POST", f"/kvside/sessions/{check_name(name)}/save", json={})
            return dict(out, path=f"{out['file']} in the daemon's sessions folder")
        dst = Path(path)
        if dst.is_dir():
            dst = dst / f"{name}{SUFFIX}"
        try:
            with self.http.stream("GET", f"/kvside/sessions/{check_name(name)}/file") as r:
                if r.status_code >= 400:
                    r.read()
                    self._raise(r)
                size = 0
                with atomic_writer(dst) as f:
                    for chunk in r.iter_bytes():
                        f.write(chunk)
                        size += len(chunk)
        except httpx.HTTPError as exc:
            raise KvsideError(f"daemon at {self.url}: {exc}") from None
        except OSError as exc:
            raise KvsideError(f"could not write {dst}: {exc.strerror or exc}") from None
        sessionfile.read_header(dst, verify=True)  # what arrived is whole
        return {"session": name, "path": str(dst), "bytes": size}

    def restore(self, path: str, name: str | None) -> dict:
        """Send a session file from here to the daemon, which checks it in full and loads it."""
        src = Path(path)
        sf = sessionfile.read_header(src, verify=True)  # a bad file is refused before it travels
        name = check_name(name or sf.header.get("name") or src.stem)
        with open(src, "rb") as f:
            return self._call("PUT", f"/kvside/sessions/{name}/file", content=f,
                              headers={"Content-Type": "application/octet-stream"})

    def _raise(self, r) -> None:
        try:
            message = r.json().get("error", {}).get("message")
        except ValueError:
            message = None
        raise KvsideError(message or f"daemon at {self.url} answered HTTP {r.status_code}")
