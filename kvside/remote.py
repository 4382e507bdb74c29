"""The CLI's way to a running daemon: when `kvside serve` runs (found by --connect URL, KVSIDE_URL,
or the default address answering /health), session commands act on the daemon's live sessions
through its endpoints instead of on files."""

from __future__ import annotations

import os
from pathlib import Path

import httpx

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
            raise KvsideError(data.get("error", {}).get("message", f"HTTP {r.status_code}"))
        return data

    def sessions(self) -> list[dict]:
        return self._call("GET", "/kvside/sessions")["sessions"]

    def show(self, name: str) -> dict:
        return self._call("GET", f"/kvside/sessions/{name}")

    def remove(self, name: str) -> dict:
        return self._call("DELETE", f"/kvside/sessions/{name}")

    def save(self, name: str, path: str | None) -> dict:
        body = {"path": str(Path(path).resolve())} if path else {}
        return self._call("POST", f"/kvside/sessions/{name}/save", json=body)

    def restore(self, path: str, name: str | None) -> dict:
        return self._call("POST", "/kvside/restore", json={"path": str(Path(path).resolve()), "name": name})
