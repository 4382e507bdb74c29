"""A model larger than one machine: llama.cpp's RPC backend puts layers on `rpc-server` processes
on other hosts (tools/rpc in llama.cpp; `make rpc-server`). An RPC server is a device like a GPU:
its layers' weights and KV cells live there, and every graph that touches them (decode, the K
shift of a roll, a recompute, a state read for a save) runs there. kvside's edits need nothing
else from it.

llama.cpp calls its RPC server insecure (no authentication, no encryption, and a server trusts
what it is sent): kvside connects to loopback servers only unless told --rpc-allow-remote, for a
network the user trusts (docs/scale-out.md).

Devices are registered with ggml once per process, for the whole process; each model is then
given its own device list, so an engine without --rpc never touches an RPC server (nor fails
when one has gone)."""

from __future__ import annotations

import ctypes
import ipaddress
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

from kvside._llama import lib, library_path
from kvside.errors import InvalidRequest, KvsideError

DEVICE_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel", 4: "meta"}
_lock = threading.Lock()
_servers: dict[str, list[int]] = {}  # endpoint -> its devices (ggml_backend_dev_t), registered


class RpcUnavailable(KvsideError):
    status = 503
    kind = "server_error"
    code = "rpc_unavailable"


@dataclass(frozen=True)
class Device:
    ptr: int
    name: str
    description: str
    type: str
    backend: str
    free: int
    total: int

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "type": self.type, "backend": self.backend,
                "memory_free": self.free, "memory_total": self.total}


def parse_servers(spec: str | list[str] | None, allow_remote: bool = False) -> list[str]:
    """HOST:PORT[,HOST:PORT...] checked: a port, no duplicates, loopback unless allow_remote."""
    if not spec:
        return []
    items = spec if isinstance(spec, list) else spec.split(",")
    servers = []
    for item in (i.strip() for i in items):
        host, _, port = item.rpartition(":")
        host = host.strip("[]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise InvalidRequest(f"--rpc: {item!r} is not HOST:PORT")
        if not allow_remote and not _loopback(host):
            raise InvalidRequest(f"--rpc: {host} is not this machine. llama.cpp's RPC server has no "
                                 "authentication or encryption: use it on a network you trust, and say so with "
                                 "--rpc-allow-remote (docs/scale-out.md)")
        if item in servers:
            raise InvalidRequest(f"--rpc: {item} is named twice")
        servers.append(item)
    return servers


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def supported() -> bool:
    return bool(lib.llama_supports_rpc())


_ggml_lib: ctypes.CDLL | None = None


def _ggml() -> ctypes.CDLL:
    """ggml's registry, from the libggml beside the libllama that was loaded (the wheel's or the
    patched build's): the same library, so the devices registered here are the ones llama sees."""
    global _ggml_lib
    if _ggml_lib is None:
        folder = Path(library_path()).parent
        candidates = sorted(folder.glob("libggml.so*")) + sorted(folder.glob("libggml.dylib")) + \
            sorted(folder.glob("ggml.dll"))
        if not candidates:
            raise RpcUnavailable(f"no libggml next to {library_path()}")
        g = ctypes.CDLL(str(candidates[0]))
        vp, cp, sz = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t
        for name, res, args in (
            ("ggml_backend_reg_by_name", vp, [cp]),
            ("ggml_backend_reg_get_proc_address", vp, [vp, cp]),
            ("ggml_backend_register", None, [vp]),
            ("ggml_backend_reg_name", cp, [vp]),
            ("ggml_backend_reg_dev_count", sz, [vp]),
            ("ggml_backend_reg_dev_get", vp, [vp, sz]),
            ("ggml_backend_dev_count", sz, []),
            ("ggml_backend_dev_get", vp, [sz]),
            ("ggml_backend_dev_name", cp, [vp]),
            ("ggml_backend_dev_description", cp, [vp]),
            ("ggml_backend_dev_type", ctypes.c_int, [vp]),
            ("ggml_backend_dev_backend_reg", vp, [vp]),
            ("ggml_backend_dev_memory", None, [vp, ctypes.POINTER(sz), ctypes.POINTER(sz)]),
        ):
            fn = getattr(g, name)
            fn.restype, fn.argtypes = res, args
        _ggml_lib = g
    return _ggml_lib


def _device(ptr: int, with_memory: bool = True) -> Device:
    g = _ggml()
    free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
    if with_memory:
        g.ggml_backend_dev_memory(ptr, ctypes.byref(free), ctypes.byref(total))
    backend = (g.ggml_backend_reg_name(g.ggml_backend_dev_backend_reg(ptr)) or b"?").decode()
    return Device(ptr, g.ggml_backend_dev_name(ptr).decode(), (g.ggml_backend_dev_description(ptr) or b"").decode(),
                  DEVICE_TYPES.get(g.ggml_backend_dev_type(ptr), "?"), backend, free.value, total.value)


def connect(servers: list[str], timeout_s: float = 5.0) -> list[Device]:
    """Register the RPC servers' devices (once per endpoint per process) and return them in the
    order given. A server that does not answer is a clear error, never a hang or a crash."""
    if not servers:
        return []
    if not supported():
        raise RpcUnavailable("this llama.cpp was built without the RPC backend (rebuild: make setup, "
                             "which builds it unless RPC=0)")
    g = _ggml()
    devices = []
    with _lock:
        for endpoint in servers:
            if endpoint not in _servers:
                host, _, port = endpoint.rpartition(":")
                try:  # llama.cpp's own connect has no timeout: ask first
                    socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
                except OSError as exc:
                    raise RpcUnavailable(f"no rpc-server answers at {endpoint}: {exc}") from None
                rpc = g.ggml_backend_reg_by_name(b"RPC")
                add = g.ggml_backend_reg_get_proc_address(rpc, b"ggml_backend_rpc_add_server") if rpc else None
                if not add:
                    raise RpcUnavailable("this llama.cpp's RPC backend cannot add servers")
                reg = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)(add)(endpoint.encode())
                if not reg:
                    raise RpcUnavailable(f"the rpc-server at {endpoint} did not answer llama.cpp "
                                         "(another version of llama.cpp, or not an rpc-server)")
                g.ggml_backend_register(reg)
                _servers[endpoint] = [g.ggml_backend_reg_dev_get(reg, i) for i in range(g.ggml_backend_reg_dev_count(reg))]
            devices += [_device(ptr) for ptr in _servers[endpoint]]
    return devices


def local_devices() -> list[Device]:
    """This machine's offload devices (GPUs; integrated ones when there is no discrete one)."""
    g = _ggml()
    found = [_device(g.ggml_backend_dev_get(i), with_memory=False) for i in range(g.ggml_backend_dev_count())]
    local = [d for d in found if d.backend != "RPC"]
    gpus = [d for d in local if d.type == "gpu"]
    return gpus or [d for d in local if d.type == "igpu"]


def model_devices(servers: list[str]) -> ctypes.Array | None:
    """The NULL-terminated device list for a model's params: its RPC servers' devices first (as
    llama.cpp orders them), then the local GPUs. None (llama.cpp's own choice) while no RPC server
    was ever registered in this process, which is what every engine without --rpc gets."""
    with _lock:
        if not _servers:
            return None
        remote = [ptr for endpoint in servers for ptr in _servers[endpoint]]
    pointers = remote + [d.ptr for d in local_devices()]
    return (ctypes.c_void_p * (len(pointers) + 1))(*pointers, None)


def all_devices() -> list[dict]:
    g = _ggml()
    return [_device(g.ggml_backend_dev_get(i), with_memory=False).to_dict() for i in range(g.ggml_backend_dev_count())]
