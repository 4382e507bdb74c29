"""The fleet recipe: HAProxy in front of several `kvside serve --shared-sessions` daemons that
share one sessions folder (docs/scale-out.md). `kvside proxy-config` prints this configuration.

Affinity keeps a conversation on the daemon whose cache holds it: requests that name their
session (the X-Kvside-Session header) are hashed by that name; the others by their first two
messages (system prompt and first user turn), so one client's conversations spread over the
daemons while each conversation stays on one. The hash is consistent: when a daemon goes, only
its conversations move, and the daemon they move to opens their sessions from the shared folder
(handed over, or taken from a dead daemon). /health checks take a draining daemon out at once;
`retries` with `redispatch` sends a request that found a daemon gone to another one."""

from __future__ import annotations

TEMPLATE = """\
# kvside fleet: HAProxy in front of {n} kvside daemons sharing one sessions folder
# (each started as: kvside serve --shared-sessions --sessions FOLDER --port PORT)
global
    log stdout format raw local0 warning

defaults
    mode http
    log global
    timeout connect 2s
    timeout client {timeout}
    timeout server {timeout}
    # a request that finds its daemon gone (drained or killed) goes to another one
    retries 3
    option redispatch

frontend kvside
    bind {listen}
    # the body is read before the server is chosen: sessionless requests are hashed by it
    option http-buffer-request
    http-request set-var(txn.affinity) req.hdr(X-Kvside-Session)
    http-request set-var(txn.m0) req.body,json_query('$.messages[0].content') if !{{ var(txn.affinity) -m found }}
    http-request set-var(txn.m1) req.body,json_query('$.messages[1].content') if !{{ var(txn.affinity) -m found }}
    http-request set-var(txn.affinity) var(txn.m0),concat(,txn.m1,) if !{{ var(txn.affinity) -m found }} {{ var(txn.m0) -m found }}
    http-request set-var(txn.affinity) req.body,json_query('$.prompt') if !{{ var(txn.affinity) -m found }}
    default_backend daemons

backend daemons
    balance hash var(txn.affinity)
    hash-type consistent
    option httpchk GET /health
    http-check expect status 200
    default-server inter {check_interval} fall 2 rise 2
{servers}
"""


def haproxy_config(listen: str, daemons: list[str], timeout: str = "10m", check_interval: str = "500ms") -> str:
    """HAProxy's configuration for a fleet: `listen` HOST:PORT, `daemons` HOST:PORT each."""
    for address in [listen, *daemons]:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{address!r} is not HOST:PORT")
    if not daemons:
        raise ValueError("a fleet needs at least one daemon")
    servers = "\n".join(f"    server d{i} {address} check" for i, address in enumerate(daemons, 1))
    return TEMPLATE.format(n=len(daemons), listen=listen, timeout=timeout, check_interval=check_interval,
                           servers=servers)
