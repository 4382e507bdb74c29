"""The models one daemon serves: the one it started with, and any other installed model a request
names in its `model` field, loaded on demand.

Each model runs in an Engine of its own (its own context, engine thread and sessions, saved under
`sessions/models/<name>/`: a session belongs to its model and is never restored into another).
Models other than the first unload when they have been idle past their keep-alive (Ollama's
`keep_alive`: seconds, "5m", 0 to unload after the request, a negative value to keep), and the least
recently used idle one unloads when a load would exceed `--max-models` or `--memory-budget` (the
model file plus its KV cache, estimated from the model's shape). Only installed models can be named
(`kvside models`): a request never makes the daemon open a path.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kvside.errors import InvalidRequest, KvsideError, ModelNotFound

DEFAULT_KEEP_ALIVE_S = 300.0  # Ollama's default
# A model handed to a request is not unloaded for this long, even with keep_alive 0: the request
# has yet to claim a session on it (from then on the busy session keeps it).
GRACE_S = 2.0


class ModelUnavailable(KvsideError):
    status = 503
    kind = "server_error"
    code = "model_unavailable"


def parse_keep_alive(value) -> float | None:
    """Ollama's keep_alive: a number of seconds, a duration ("5m", "1h30m", "10s"), 0 (unload after
    the request) or negative (never). None when absent. Raises on anything else."""
    from kvside.errors import InvalidRequest

    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidRequest("'keep_alive' must be a duration", param="keep_alive")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"-?\d+(\.\d+)?", text):
            return float(text)
        parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text)
        if parts and "".join(a + b for a, b in parts) == text.lstrip("-"):
            seconds = sum(float(n) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[u] for n, u in parts)
            return -seconds if text.startswith("-") else seconds
    raise InvalidRequest(f"'keep_alive' must be seconds or a duration like 5m, not {value!r}", param="keep_alive")


@dataclass
class Loaded:
    name: str
    engine: object  # an Engine
    size: int  # bytes: weights and KV cache
    last_used: float
    keep_alive: float  # seconds idle before unloading; < 0: never
    primary: bool = False


class ModelPool:
    def __init__(self, primary, *, make_engine: Callable[[str, Path], object] | None = None,
                 max_models: int = 1, memory_budget: int | None = None, sessions_dir: Path | None = None):
        info = primary.info()
        self.primary_name = info["model_name"]
        self.aliases = {self.primary_name, "default", Path(info["model"]["path"]).name}
        self.make_engine = make_engine
        self.max_models = max(1, max_models)
        self.memory_budget = memory_budget
        self.sessions_dir = sessions_dir
        self.loaded: dict[str, Loaded] = {
            self.primary_name: Loaded(self.primary_name, primary, footprint(info), time.time(), -1.0, primary=True)}
        self.lock = threading.Lock()  # one lookup, load or unload at a time
        self.infos: dict[str, dict] = {self.primary_name: info}
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None

    def start(self, interval_s: float = 1.0) -> "ModelPool":
        """Unload models past their keep-alive in the background (only needed when others can load)."""
        if self.make_engine is not None and self._reaper is None:
            def loop():
                while not self._stop.wait(interval_s):
                    self.reap()

            self._reaper = threading.Thread(target=loop, name="kvside-models", daemon=True)
            self._reaper.start()
        return self

    # -- names --------------------------------------------------------------------------------------
    def canonical(self, model: str | None) -> str:
        """The installed model a request's `model` names (":latest" ignored). Raises ModelNotFound."""
        from kvside.models import available

        if model is None or model in self.aliases:
            return self.primary_name
        if model.endswith(":latest"):
            model = model[: -len(":latest")]
            if model in self.aliases:
                return self.primary_name
        if self.make_engine is None:
            raise ModelNotFound(f"model {model!r} is not served here (this daemon serves {self.primary_name!r}; "
                                "start it with --max-models 2 or more to load others on demand)", param="model")
        installed = available()
        for ref in installed:
            if model in (ref.name, ref.path.name, ref.path.stem):
                return ref.name
        names = ", ".join(r.name for r in installed)
        raise ModelNotFound(f"model {model!r} is not installed (installed: {names}; kvside pull to add one)",
                            param="model")

    # -- loading ------------------------------------------------------------------------------------
    def get(self, model: str | None, keep_alive: float | None = None):
        """(name, engine) for a request; loads the model if needed (blocking: call off the event loop)."""
        name = self.canonical(model)
        with self.lock:  # (a load holds it for seconds; requests for loaded models wait that long at most)
            entry = self.loaded.get(name) or self._load(name)
            entry.last_used = time.time()
        if keep_alive is not None and not entry.primary:
            entry.keep_alive = keep_alive
        return name, entry.engine

    def _load(self, name: str) -> Loaded:
        from kvside.models import resolve

        ref = resolve(name)
        if self.memory_budget is not None and ref.size > self.memory_budget:
            raise ModelUnavailable(f"model {name!r} needs {ref.size / 1e6:.1f} MB for its weights alone, more than "
                                   f"the memory budget ({self.memory_budget / 1e6:.1f} MB)")
        self._make_room(ref.size, name)  # the weights; its KV cache is known once it is loaded
        folder = (self.sessions_dir / "models" / _folder_name(name)) if self.sessions_dir else None
        engine = self.make_engine(name, folder)
        info = engine.info()
        entry = Loaded(name, engine, footprint(info), time.time(), DEFAULT_KEEP_ALIVE_S)
        self.infos[name] = info
        self.loaded[name] = entry
        try:
            self._make_room(0, name, keep=name)  # now with its cache: others may have to go, or it does
        except ModelUnavailable:
            self._unload(entry)
            raise
        return entry

    def _make_room(self, need: int, name: str, keep: str | None = None) -> None:
        """Unload idle models, least recently used first, until `need` more bytes (and one more model,
        unless `keep` is already loaded) fit."""
        def over() -> bool:
            n = len(self.loaded) + (0 if keep else 1) > self.max_models
            m = self.memory_budget is not None and sum(e.size for e in self.loaded.values()) + need > self.memory_budget
            return n or m

        while over():
            idle = sorted((e for e in self.loaded.values()
                           if not e.primary and e.name != keep and not busy(e.engine)), key=lambda e: e.last_used)
            if idle:
                self._unload(idle[0])
                continue
            staying = ", ".join(f"{e.name} ({e.size / 1e6:.1f} MB)" for e in self.loaded.values() if e.name != keep)
            if any(not e.primary and e.name != keep for e in self.loaded.values()):
                raise ModelUnavailable(f"no room for {name!r}: the other loaded models are busy ({staying}); "
                                       "try again when a request has finished")
            if self.memory_budget is not None and len(self.loaded) + (0 if keep else 1) <= self.max_models:
                raise ModelUnavailable(f"model {name!r} ({(need + (self.loaded[keep].size if keep else 0)) / 1e6:.1f} MB "
                                       f"with its cache) does not fit in the memory budget "
                                       f"({self.memory_budget / 1e6:.1f} MB) beside {staying}")
            raise ModelUnavailable(f"no room for {name!r}: --max-models {self.max_models} are loaded and stay")

    def _unload(self, entry: Loaded) -> None:
        self.loaded.pop(entry.name, None)
        self.infos.pop(entry.name, None)
        entry.engine.close()  # saves its sessions (persist) before freeing the model

    def unload(self, name: str) -> bool:
        """Unload model `name` now (to delete its files); False when it is not loaded. The daemon's
        first model never unloads; a model answering a request is ModelUnavailable."""
        with self.lock:
            entry = self.loaded.get(name)
            if entry is None:
                return False
            if entry.primary:
                raise InvalidRequest(f"{name!r} is the model this daemon serves; it cannot be removed while it runs",
                                     param="model")
            if busy(entry.engine):
                raise ModelUnavailable(f"{name!r} is answering a request; try again when it has finished")
            self._unload(entry)
            return True

    def describe(self, model: str | None) -> tuple[dict, str, bool]:
        """(info, chat template source, has FIM tokens) of an installed model, without loading it
        when it is not loaded (its vocabulary and metadata only: Ollama's /api/show is asked for
        every listed model, and answering it must not unload the ones in use)."""
        from kvside.engine import families, prompt
        from kvside.engine.model import Model
        from kvside.models import resolve

        name = self.canonical(model)
        entry = self.loaded.get(name)
        if entry is not None:
            def facts(core):
                return core.template.source, prompt.has_fim(core)

            source, fim = entry.engine.call(facts)
            return self.infos[name], source, fim
        ref = resolve(name)
        m = Model(ref.path, vocab_only=True)
        try:
            # a vocabulary-only model has no shape to ask llama.cpp for (its accessors abort): the metadata says it
            arch, meta = m.architecture, m.meta

            def number(key: str) -> int:
                try:
                    return int(float(meta.get(key, 0)))
                except ValueError:
                    return 0

            mi = {"architecture": arch, "n_ctx_train": number(f"{arch}.context_length"),
                  "n_embd": number(f"{arch}.embedding_length"), "n_layer": number(f"{arch}.block_count"),
                  "n_params": number("general.parameter_count"), "n_vocab": m.n_vocab, "size_bytes": ref.size,
                  "fingerprint": m.fingerprint, "description": meta.get("general.name", name)}
            n_ctx = min(self.infos[self.primary_name]["n_ctx"], mi["n_ctx_train"] or 1 << 30)
            info = {"model_name": name, "model": mi, "n_ctx": n_ctx, "n_gpu_layers": 0}
            source = families.choose(m, None).source
            fim = min(lib_fim(m)) >= 0
        finally:
            m.close()
        return info, source, fim

    def reap(self, now: float | None = None) -> list[str]:
        """Unload the idle models whose keep-alive has run out; returns their names."""
        now = time.time() if now is None else now
        gone = []
        with self.lock:
            for entry in list(self.loaded.values()):
                idle_for = now - entry.last_used
                if entry.primary or entry.keep_alive < 0 or idle_for < max(entry.keep_alive, GRACE_S):
                    continue
                if busy(entry.engine):
                    continue
                self._unload(entry)
                gone.append(entry.name)
        return gone

    def close(self) -> None:
        self._stop.set()
        if self._reaper is not None:
            self._reaper.join(timeout=10)
        with self.lock:
            for entry in list(self.loaded.values()):
                if not entry.primary:
                    self._unload(entry)


def lib_fim(m) -> tuple[int, int, int]:
    from kvside._llama import lib

    return lib.llama_vocab_fim_pre(m.vocab), lib.llama_vocab_fim_suf(m.vocab), lib.llama_vocab_fim_mid(m.vocab)


def busy(engine) -> bool:
    try:
        return bool(engine.call(lambda core: core.active or any(s.busy for s in core.sessions.values()), timeout=5))
    except Exception:
        return False  # an engine that cannot answer is not serving anyone


def footprint(info: dict) -> int:
    """Bytes a loaded model holds: its weights and its KV cache (f16 K and V for every cell and layer)."""
    m = info["model"]
    head_dim = m["n_embd"] // max(m["n_head"], 1)
    kv = info["n_cells"] * m["n_layer"] * 2 * m["n_head_kv"] * head_dim * 2
    return int(m["size_bytes"]) + kv


def _folder_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "--", name)


def parse_size(text: str) -> int:
    """"800M", "4G", "1.5GB", "2048" (bytes) -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"not a size: {text!r} (examples: 800M, 4G)")
    return int(float(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2).upper()])
