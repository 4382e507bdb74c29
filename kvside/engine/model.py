"""A loaded GGUF model: vocabulary, tokenizer, metadata. Owns the llama_model pointer."""

from __future__ import annotations

import ctypes
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from kvside._llama import capture_log, lib, recent_log
from kvside.errors import InvalidRequest, ModelLoadError
from kvside.models import check_gguf, fingerprint

_LAYER_LINE = re.compile(r"layer +(\d+) assigned to device ([^,]+),")
ROPE_TYPES = {-1: "none", 0: "norm", 2: "neox", 8: "mrope", 24: "vision", 40: "imrope"}


@dataclass(frozen=True)
class ModelInfo:
    path: str
    fingerprint: str
    architecture: str
    description: str
    n_ctx_train: int
    n_vocab: int
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_params: int
    size_bytes: int
    rope_type: str
    rope_freq_base: float | None
    has_chat_template: bool

    def to_dict(self) -> dict:
        return asdict(self)


class Model:
    """Loads with llama.cpp; every failure is a ModelLoadError that says why in one line."""

    def __init__(self, path: Path, *, n_gpu_layers: int = 0, vocab_only: bool = False,
                 devices: ctypes.Array | None = None, tensor_split: list[float] | None = None):
        """devices: a NULL-terminated device list (rpc.model_devices), None for llama.cpp's
        choice; tensor_split: each device's share of the offloaded layers."""
        self.path = Path(path)
        check_gguf(self.path)
        params = lib.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        params.vocab_only = vocab_only
        if devices is not None:
            params.devices = ctypes.cast(devices, ctypes.c_void_p)
        split = None
        if tensor_split:
            n_max = lib.llama_max_devices()
            if len(tensor_split) > n_max:
                raise InvalidRequest(f"--tensor-split names {len(tensor_split)} devices; llama.cpp takes at most {n_max}")
            split = (ctypes.c_float * n_max)(*tensor_split)
            params.tensor_split = split
        with capture_log() as lines:
            ptr = lib.llama_model_load_from_file(str(self.path).encode(), params)
        if not ptr:
            raise ModelLoadError(f"llama.cpp could not load {self.path.name}: {recent_log(3) or 'unknown reason'}")
        self.ptr = ptr
        # which device holds each layer (llama.cpp says so only in its log; `kvside doctor` shows it)
        self.layer_devices: dict[int, str] = {}
        for line in lines:
            m = _LAYER_LINE.search(line)
            if m:
                self.layer_devices[int(m.group(1))] = m.group(2)
        self.vocab = lib.llama_model_get_vocab(ptr)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        self.meta = self._read_metadata()
        self._piece_cache: dict[int, bytes] = {}
        self.fingerprint = fingerprint(self.path)

    def close(self) -> None:
        if getattr(self, "ptr", None):
            lib.llama_model_free(self.ptr)
            self.ptr = None

    # -- metadata ---------------------------------------------------------------------------
    def _read_metadata(self) -> dict[str, str]:
        meta: dict[str, str] = {}
        buf_size = 1 << 20  # chat templates can be long
        buf = ctypes.create_string_buffer(buf_size)
        for i in range(lib.llama_model_meta_count(self.ptr)):
            n = lib.llama_model_meta_key_by_index(self.ptr, i, buf, buf_size)
            if n < 0:
                continue
            key = buf.value.decode("utf-8", errors="replace")
            n = lib.llama_model_meta_val_str_by_index(self.ptr, i, buf, buf_size)
            if n < 0:
                continue
            meta[key] = buf.value.decode("utf-8", errors="replace")
        return meta

    @property
    def architecture(self) -> str:
        return self.meta.get("general.architecture", "unknown")

    @property
    def chat_template(self) -> str | None:
        return self.meta.get("tokenizer.chat_template") or None

    def info(self) -> ModelInfo:
        arch = self.architecture
        freq = self.meta.get(f"{arch}.rope.freq_base")
        rope = lib.llama_model_rope_type(self.ptr)
        return ModelInfo(
            path=str(self.path),
            fingerprint=self.fingerprint,
            architecture=arch,
            description=_model_desc(self.ptr),
            n_ctx_train=lib.llama_model_n_ctx_train(self.ptr),
            n_vocab=self.n_vocab,
            n_layer=lib.llama_model_n_layer(self.ptr),
            n_embd=lib.llama_model_n_embd(self.ptr),
            n_head=lib.llama_model_n_head(self.ptr),
            n_head_kv=lib.llama_model_n_head_kv(self.ptr),
            n_params=lib.llama_model_n_params(self.ptr),
            size_bytes=lib.llama_model_size(self.ptr),
            rope_type=ROPE_TYPES.get(rope, str(rope)),
            rope_freq_base=float(freq) if freq else None,
            has_chat_template=self.chat_template is not None,
        )

    # -- tokens -----------------------------------------------------------------------------
    def tokenize(self, text: str, *, add_special: bool = False, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (lib.llama_token * cap)()
        n = lib.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:  # buffer too small: -n is the size needed
            cap = -n
            buf = (lib.llama_token * cap)()
            n = lib.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            raise InvalidRequest("text could not be tokenized")
        return list(buf[:n])

    def piece(self, token: int, *, special: bool = False) -> bytes:
        """The bytes a token stands for (special tokens render empty unless `special`)."""
        key = token if not special else -token - 1
        cached = self._piece_cache.get(key)
        if cached is not None:
            return cached
        buf = ctypes.create_string_buffer(64)
        n = lib.llama_token_to_piece(self.vocab, token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = lib.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
        value = buf.raw[: max(n, 0)]
        self._piece_cache[key] = value
        return value

    def detokenize(self, tokens: list[int], *, special: bool = False) -> str:
        return b"".join(self.piece(t, special=special) for t in tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return bool(lib.llama_vocab_is_eog(self.vocab, token))

    def token_text(self, token: int) -> str:
        return self.piece(token, special=True).decode("utf-8", errors="replace")

    @property
    def bos(self) -> int:
        return lib.llama_vocab_bos(self.vocab)

    @property
    def eos(self) -> int:
        return lib.llama_vocab_eos(self.vocab)

    @property
    def add_bos(self) -> bool:
        return bool(lib.llama_vocab_get_add_bos(self.vocab))


def _model_desc(ptr) -> str:
    buf = ctypes.create_string_buffer(256)
    lib.llama_model_desc(ptr, buf, 256)
    return buf.value.decode("utf-8", errors="replace")
