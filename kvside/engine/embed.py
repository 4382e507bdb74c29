"""Embeddings: a llama context of its own that only embeds, so the chat sessions' cache is never
touched. With an embedding GGUF (`--embedding-model`) it runs that model, pooled as the GGUF says;
without one it runs the chat model's weights and mean-pools their last hidden states: usable for
similarity within one model, not a trained retrieval embedding (the daemon says so in /props).
Created on the first request, on the engine thread, like every llama call."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from kvside._llama import lib, recent_log
from kvside.engine.batch import Batch
from kvside.engine.model import Model
from kvside.errors import InvalidRequest, KvsideError

POOLING = {0: "none", 1: "mean", 2: "cls", 3: "last", 4: "rank"}
MAX_CTX = 8192  # an embedding context need not span a long model's whole training window


class Embedder:
    def __init__(self, chat_model: Model, path: Path | None, n_ctx: int, n_threads: int, n_gpu_layers: int = 0,
                 compute=None):
        self.compute = compute or (lambda fn, *args: fn(*args))  # on the process's compute thread (compute.py)
        self.own = path is not None
        self.model = Model(path, n_gpu_layers=n_gpu_layers) if self.own else chat_model
        try:
            info = self.model.info()
            self.name = path.stem if self.own else None
            self.n_ctx = min(info.n_ctx_train, MAX_CTX) if self.own else n_ctx
            self.n_embd = lib.llama_model_n_embd(self.model.ptr)
            params = lib.llama_context_default_params()
            params.embeddings = True
            params.n_ctx = self.n_ctx
            params.n_batch = params.n_ubatch = self.n_ctx  # an encoder reads its input in one ubatch
            params.n_seq_max = 1
            params.no_perf = True
            params.n_threads = params.n_threads_batch = n_threads
            # the GGUF's pooling for an embedding model; the mean of the hidden states for a chat model
            params.pooling_type = lib.LLAMA_POOLING_TYPE_UNSPECIFIED if self.own else lib.LLAMA_POOLING_TYPE_MEAN
            self.ctx = lib.llama_init_from_model(self.model.ptr, params)
            if not self.ctx:
                raise KvsideError(f"llama.cpp could not create an embedding context: {recent_log(3)}")
            self.pooling = POOLING.get(lib.llama_pooling_type(self.ctx), "mean")
            self.encoder = bool(lib.llama_model_has_encoder(self.model.ptr)) and \
                not lib.llama_model_has_decoder(self.model.ptr)
            self.batch = Batch(self.n_ctx)
        except BaseException:
            if self.own:
                self.model.close()
            raise

    def close(self) -> None:
        self.batch.close()
        if self.ctx:
            lib.llama_free(self.ctx)
            self.ctx = None
        if self.own:
            self.model.close()

    def describe(self) -> dict:
        return {"model": self.name or "the chat model", "pooling": self.pooling, "n_embd": self.n_embd,
                "n_ctx": self.n_ctx, "trained_for_embeddings": self.own}

    def tokenize(self, text: str) -> list[int]:
        return self.model.tokenize(text, add_special=True, parse_special=False)

    def fit(self, tokens: list[int], truncate: bool) -> list[int]:
        if not tokens:
            raise InvalidRequest("an input is empty", param="input")
        if len(tokens) > self.n_ctx:
            if not truncate:
                raise InvalidRequest(f"an input has {len(tokens)} tokens; the embedding context holds {self.n_ctx}",
                                     param="input")
            tokens = tokens[:self.n_ctx]
        bad = [t for t in tokens if not 0 <= t < self.model.n_vocab]
        if bad:
            raise InvalidRequest(f"token id {bad[0]} is not one of the model's", param="input")
        return tokens

    def embed(self, tokens: list[int]) -> np.ndarray:
        """One input's vector (pooled; with pooling `none`, the last token's)."""
        mem = lib.llama_get_memory(self.ctx)
        if mem:
            lib.llama_memory_clear(mem, True)
        self.batch.clear()
        for i, t in enumerate(tokens):
            self.batch.add(t, i, 0, True)
        rc = self.compute(lib.llama_encode if self.encoder else lib.llama_decode, self.ctx, self.batch.raw)
        if rc != 0:
            raise KvsideError(f"llama.cpp could not embed the input (code {rc}): {recent_log(2)}")
        ptr = lib.llama_get_embeddings_seq(self.ctx, 0) if self.pooling != "none" else \
            lib.llama_get_embeddings_ith(self.ctx, len(tokens) - 1)
        if not ptr:
            raise KvsideError("llama.cpp returned no embedding")
        return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(self.n_embd,)).copy()


def normalized(v: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(v))
    return v / norm if norm > 0 else v
