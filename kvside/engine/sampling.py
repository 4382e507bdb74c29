"""Sampling through llama.cpp's sampler chain, and stop strings held back until they cannot match."""

from __future__ import annotations

import ctypes
import random
import re
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from kvside._llama import lib
from kvside.errors import InvalidRequest


INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1


@dataclass
class SamplingParams:
    temperature: float = 0.7
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    # none, as llama-server and OpenAI's API default to (the Ollama front asks for Ollama's 1.1): the
    # penalties sampler walks the whole vocabulary every token (docs/benchmarks.md, Latency)
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 512
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # keep going past end-of-generation tokens (benchmarks)

    def validate(self) -> "SamplingParams":
        """Every value in the range llama.cpp's samplers take (C ints and floats): a huge number
        is a clear error here, not an overflow in the sampler chain."""
        checks = [
            (0 <= self.temperature <= 100, "temperature", "must be in [0, 100]"),
            (0 <= self.top_k <= INT32_MAX, "top_k", "must be >= 0"),
            (0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p", "must be in [0, 1]"),
            (0 < self.repeat_penalty <= 100, "repeat_penalty", "must be in (0, 100]"),
            (0 <= self.repeat_last_n <= INT32_MAX, "repeat_last_n", "must be >= 0"),
            (-100 <= self.frequency_penalty <= 100, "frequency_penalty", "must be in [-100, 100]"),
            (-100 <= self.presence_penalty <= 100, "presence_penalty", "must be in [-100, 100]"),
            (self.seed is None or -INT64_MAX <= self.seed <= INT64_MAX, "seed", "must fit in 64 bits"),
            (1 <= self.max_tokens <= INT32_MAX, "max_tokens", "must be >= 1"),
            (len(self.stop) <= 16 and all(isinstance(s, str) for s in self.stop), "stop", "at most 16 strings"),
        ]
        for ok, name, why in checks:
            if not ok:
                raise InvalidRequest(f"{name} {why}", param=name)
        return self

    def replace(self, **changes) -> "SamplingParams":
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise InvalidRequest(f"unknown sampling parameter: {', '.join(sorted(unknown))}")
        data = asdict(self)
        data.update({k: v for k, v in changes.items() if v is not None})
        return SamplingParams(**data).validate()


class Sampler:
    """One llama.cpp sampler chain for one generation. `sample` also records the token (accept).

    constraint: a grammar (reply.Constraint) applied first, so every other sampler only ever
    sees tokens the grammar allows; a lazy one waits for its trigger patterns."""

    def __init__(self, params: SamplingParams, history: list[int], n_vocab: int, *, vocab=None, constraint=None,
                 tokenize=None):
        chain_params = lib.llama_sampler_chain_default_params()
        chain_params.no_perf = True
        self.chain = lib.llama_sampler_chain_init(chain_params)
        self.n_vocab = n_vocab
        if constraint is not None:
            self._add(_grammar_sampler(vocab, constraint, tokenize))
        penalised = (
            params.repeat_penalty != 1.0 or params.frequency_penalty != 0.0 or params.presence_penalty != 0.0
        )
        penalties = None
        if penalised and params.repeat_last_n > 0:
            penalties = lib.llama_sampler_init_penalties(
                n_vocab, params.repeat_last_n, params.repeat_penalty, params.frequency_penalty, params.presence_penalty
            )
            self._add(penalties)
        if params.temperature <= 0:
            self._add(lib.llama_sampler_init_greedy())
        else:
            if params.top_k > 0:
                self._add(lib.llama_sampler_init_top_k(params.top_k))
            self._add(lib.llama_sampler_init_top_p(params.top_p, 1))
            if params.min_p > 0:
                self._add(lib.llama_sampler_init_min_p(params.min_p, 1))
            self._add(lib.llama_sampler_init_temp(params.temperature))
            seed = params.seed if params.seed is not None else random.getrandbits(32)
            self._add(lib.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        if penalties is not None:
            # the prompt counts for the penalties only: a grammar starts at the reply
            for token in history[-params.repeat_last_n :]:
                lib.llama_sampler_accept(penalties, token)

    def _add(self, sampler) -> None:
        lib.llama_sampler_chain_add(self.chain, sampler)

    def sample(self, ctx, index: int) -> int:
        return lib.llama_sampler_sample(self.chain, ctx, index)

    def logprobs(self, ctx, index: int, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
        """The model's log-probability of `token` at batch row `index` (before sampling shaped the
        distribution, as OpenAI reports it) and the `top` most likely tokens."""
        logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, index), shape=(self.n_vocab,)).astype(np.float64)
        peak = logits.max()
        logz = peak + np.log(np.exp(logits - peak).sum())
        best = []
        if top > 0:
            ids = np.argpartition(-logits, top)[:top]
            ids = ids[np.argsort(-logits[ids])]
            best = [(int(i), float(logits[i] - logz)) for i in ids]
        return float(logits[token] - logz), best

    def close(self) -> None:
        if self.chain:
            lib.llama_sampler_free(self.chain)
            self.chain = None


def _grammar_sampler(vocab, constraint, tokenize):
    grammar = constraint.grammar.encode()
    if constraint.lazy:
        # a trigger word that is a single token triggers on that token; others become patterns
        tokens, patterns = [], [p.encode() for p in constraint.patterns]
        for word in constraint.words:
            ids = tokenize(word)
            if len(ids) == 1:
                tokens.append(ids[0])
            else:
                patterns.append(re.escape(word).encode())
        words = (ctypes.c_char_p * max(len(patterns), 1))(*patterns)
        ids = (ctypes.c_int32 * max(len(tokens), 1))(*tokens)
        sampler = lib.llama_sampler_init_grammar_lazy_patterns(
            vocab, grammar, b"root", words, len(patterns), ids, len(tokens)
        )
    else:
        sampler = lib.llama_sampler_init_grammar(vocab, grammar, b"root")
    if not sampler:
        raise InvalidRequest("the output constraint did not compile to a grammar llama.cpp accepts")
    return sampler


class StopMatcher:
    """Feed text as it streams; text that might still grow into a stop string is held back."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was hit)."""
        if not self.stops:
            return text, False
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[: min(hits)], True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), 0, -1):
                if buf.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        self.held = buf[len(buf) - hold :]
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out
