"""What every request passes before a handler sees it: the Host it names, the Origin it comes from,
the API key it carries and the type of body it posts. One ASGI middleware, so no route can forget
a check (llama-server's one API-key middleware with a set of public endpoints is the model).

Why each check exists:
- Host: a web page can make its own domain resolve to 127.0.0.1 (DNS rebinding) and then talk to
  the daemon as a same-origin page. Such a request names the attacker's domain in Host.
- Origin: a page on any site can post to http://127.0.0.1:8077. Browsers always send Origin on
  cross-origin posts, and native clients (editors, curl, the openai library) send none.
- Content type: a `text/plain` or form post needs no CORS preflight, so it reaches the server even
  when the page cannot read the answer. Requiring application/json forces the preflight, which
  is refused here unless the origin is allowed.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from typing import Iterable

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "localhost.localdomain"}
WILDCARD_HOSTS = {"0.0.0.0", "::", ""}
PUBLIC_PATHS = {"/health"}  # answered without an API key
BODY_METHODS = {"POST", "PUT", "PATCH"}
JSON_TYPE = "application/json"
UPLOAD_TYPE = "application/octet-stream"


def _host_name(host_header: str) -> str:
    """The name in a Host header, without port or IPv6 brackets, lower case."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host[1:]
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class Guard:
    """ASGI middleware. `bind_host`: the address the daemon listens on; `allow_hosts`: more Host
    names to accept; `allow_origins`: browser origins allowed to call (exact, or "*");
    `upload_paths`: path suffixes that take application/octet-stream bodies (session files)."""

    def __init__(self, app, *, api_key: str | None = None, bind_host: str = "127.0.0.1",
                 allow_hosts: Iterable[str] = (), allow_origins: Iterable[str] = (),
                 upload_suffixes: Iterable[str] = ()):
        self.app = app
        self.api_key = api_key
        bind = _host_name(bind_host)
        self.any_ip_host = bind in WILDCARD_HOSTS  # listening everywhere: accept the machine's addresses
        self.hosts = set(LOOPBACK_NAMES) | {_host_name(h) for h in allow_hosts}
        if bind not in WILDCARD_HOSTS:
            self.hosts.add(bind)
        self.origins = {o.rstrip("/").lower() for o in allow_origins}
        self.upload_suffixes = tuple(upload_suffixes)

    # -- the checks ---------------------------------------------------------------------------
    def host_ok(self, host_header: str | None) -> bool:
        if host_header is None:
            return True  # HTTP/1.0 without Host: not a browser, and not a rebinding
        name = _host_name(host_header)
        if name in self.hosts:
            return True
        if _is_ip(name):
            return self.any_ip_host or ipaddress.ip_address(name).is_loopback
        return False

    def origin_ok(self, origin: str | None) -> bool:
        if origin is None:
            return True
        origin = origin.rstrip("/").lower()
        return "*" in self.origins or origin in self.origins

    def key_ok(self, headers: dict[str, str]) -> bool:
        if self.api_key is None:
            return True
        auth = headers.get("authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else headers.get("x-api-key", "")
        return hmac.compare_digest(token.encode(), self.api_key.encode())

    def type_ok(self, method: str, path: str, content_type: str | None) -> bool:
        if method not in BODY_METHODS:
            return True
        media = (content_type or "").split(";", 1)[0].strip().lower()
        if media == JSON_TYPE or media.endswith("+json"):
            return True
        return media == UPLOAD_TYPE and bool(self.upload_suffixes) and path.endswith(self.upload_suffixes)

    # -- ASGI ---------------------------------------------------------------------------------
    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        method, path = scope["method"], scope["path"]
        origin = headers.get("origin")
        cors = self._cors_headers(origin)
        if not self.host_ok(headers.get("host")):
            return await _refuse(send, 403, "host_not_allowed",
                                 f"Host {headers.get('host')!r} is not this daemon's address (start it with "
                                 "--allow-host NAME to accept it)", cors)
        if not self.origin_ok(origin):
            return await _refuse(send, 403, "origin_not_allowed",
                                 f"requests from the web page at {origin} are refused (start the daemon with "
                                 "--allow-origin ORIGIN to allow them)", cors)
        if method == "OPTIONS" and origin is not None:  # a CORS preflight from an allowed origin
            return await _answer(send, 204, b"", cors + [(b"access-control-allow-methods", b"GET, POST, PUT, DELETE"),
                                                         (b"access-control-allow-headers",
                                                          b"authorization, content-type, x-api-key, x-kvside-session"),
                                                         (b"access-control-max-age", b"600")])
        if path not in PUBLIC_PATHS and not self.key_ok(headers):
            return await _refuse(send, 401, "invalid_api_key", "invalid or missing API key", cors)
        if not self.type_ok(method, path, headers.get("content-type")):
            return await _refuse(send, 415, "unsupported_media_type",
                                 f"{method} bodies must be application/json (got "
                                 f"{headers.get('content-type') or 'no Content-Type'})", cors)
        if not cors:
            return await self.app(scope, receive, send)

        async def send_with_cors(message):
            if message["type"] == "http.response.start":
                message = dict(message, headers=list(message.get("headers", [])) + cors)
            await send(message)

        return await self.app(scope, receive, send_with_cors)

    def _cors_headers(self, origin: str | None) -> list[tuple[bytes, bytes]]:
        if origin is None or not self.origins or not self.origin_ok(origin):
            return []
        return [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin"),
                (b"access-control-expose-headers", b"x-kvside-session")]


async def _answer(send, status: int, body: bytes, headers: list) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-length", str(len(body)).encode())] + headers})
    await send({"type": "http.response.body", "body": body})


async def _refuse(send, status: int, code: str, message: str, extra: list) -> None:
    kind = "invalid_request_error"
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
    await _answer(send, status, body, [(b"content-type", b"application/json")] + extra)
