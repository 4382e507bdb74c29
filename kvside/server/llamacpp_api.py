"""llama-server's own endpoints, in its shapes (tools/server/server-context.cpp): `/props`,
`/tokenize`, `/detokenize`, `/apply-template`, `/completion`, `/infill`, and the `meta` block of
`/v1/models`. Zed's llama.cpp
provider reads `/props` for the window and the template's capabilities; llama.vscode counts tokens
exactly with `/apply-template` + `/tokenize`. Vocabulary: llama-server's words here."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse
from starlette.routing import Route

from kvside import __version__
from kvside.engine import prompt
from kvside.engine.sampling import SamplingParams
from kvside.errors import InvalidRequest
from kvside.server import openai_api as oa


def model_meta(info: dict) -> dict:
    """The `meta` block llama-server puts in each /v1/models entry."""
    model = info["model"]
    return {"vocab_type": None, "n_vocab": model["n_vocab"], "n_ctx": info["n_ctx"],
            "n_ctx_train": model["n_ctx_train"], "n_embd": model["n_embd"], "n_params": model["n_params"],
            "size": model["size_bytes"]}


def props(info: dict, template: dict, defaults: dict) -> dict:
    """GET /props: the window per session, the sampling defaults, the chat template and what it can
    do. kvside reads tool calls on every model, but only a template that knows tools makes a model
    that chooses them well: the caps say what the template knows, as llama-server's do."""
    return {
        "default_generation_settings": {"n_ctx": info["n_ctx"], "params": defaults},
        "total_slots": info["max_sessions"],
        "model_alias": info["model_name"],
        "model_path": info["model"]["path"].rsplit("/", 1)[-1],  # the file's name, not where it lives
        "modalities": {"vision": False, "audio": False, "video": False},
        "chat_template": template["source"],
        "chat_template_caps": {"supports_tools": template["tools"], "supports_tool_calls": template["tools"],
                               "supports_parallel_tool_calls": template["tools"],
                               "supports_tool_call_id": "tool_call_id" in template["source"],
                               "supports_system_role": template["system_role"]},
        "bos_token": template["bos_token"],
        "eos_token": template["eos_token"],
        "build_info": f"kvside {__version__}",
        "endpoint_props": True,
        "endpoint_slots": False,
        "endpoint_metrics": True,
    }


def _flag(body: dict, key: str, default: bool) -> bool:
    value = body.get(key, default)
    if not isinstance(value, bool):
        raise InvalidRequest(f"'{key}' must be true or false", param=key)
    return value


def tokenize_args(body: Any) -> tuple[str, bool, bool, bool]:
    """POST /tokenize {content, add_special=false, parse_special=true, with_pieces=false}."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    content = body.get("content", "")
    if not isinstance(content, str):
        raise InvalidRequest("'content' must be a string", param="content")
    return (content, _flag(body, "add_special", False), _flag(body, "parse_special", True),
            _flag(body, "with_pieces", False))


def tokenize(core, content: str, add_special: bool, parse_special: bool, with_pieces: bool) -> dict:
    tokens = core.model.tokenize(content, add_special=add_special, parse_special=parse_special)
    if not with_pieces:
        return {"tokens": tokens}
    out = []
    for t in tokens:
        raw = core.model.piece(t, special=True)
        try:
            piece: Any = raw.decode("utf-8")
        except UnicodeDecodeError:  # part of a character: llama-server sends the bytes
            piece = list(raw)
        out.append({"id": t, "piece": piece})
    return {"tokens": out}


def detokenize_args(body: Any, n_vocab: int) -> list[int]:
    """POST /detokenize {tokens}: every token must be one of the model's."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    tokens = body.get("tokens", [])
    if not isinstance(tokens, list) or not all(type(t) is int and 0 <= t < n_vocab for t in tokens):
        raise InvalidRequest(f"'tokens' must be a list of token ids (0 to {n_vocab - 1})", param="tokens")
    return tokens


def apply_template_args(body: Any) -> tuple[list[dict], list[dict]]:
    """POST /apply-template: the messages (and tools) of a chat completion request, checked as /v1
    checks them."""
    req = oa.parse_chat(body)
    return req.messages, req.reply.tools


def apply_template(core, messages: list[dict], tools: list[dict] = ()) -> dict:
    """The prompt the chat template makes of `messages` (with `tools`), with the reply's generation
    prompt: tokenized with add_special it is what a fresh session reads for that request."""
    return {"prompt": core.template.render(messages, add_generation_prompt=True, tools=list(tools) or None)}


def prompt_token_count(core, messages: list[dict], tools: list[dict] = ()) -> int:
    """How many tokens a fresh session reads for a chat request (the Responses API's input_tokens
    and Anthropic's count_tokens answer with it)."""
    return len(core.model.tokenize(apply_template(core, messages, tools)["prompt"], add_special=True,
                                   parse_special=True))


def template_facts(core) -> dict:
    try:
        core.template.render([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
                             add_generation_prompt=True)
        system_role = True
    except Exception:  # a template that raises on a system message does not have the role
        system_role = False
    model = core.model
    return {"source": core.template.source, "system_role": system_role, "tools": core.template.supports_tools,
            "bos_token": model.token_text(model.bos) if model.bos >= 0 else "",
            "eos_token": model.token_text(model.eos) if model.eos >= 0 else ""}


def infill_extra(body: dict) -> list[dict]:
    """/infill's input_extra: [{"filename": str, "text": str}, ...]."""
    extra = body.get("input_extra") or []
    if not isinstance(extra, list) or not all(
            isinstance(c, dict) and isinstance(c.get("filename", ""), str) and isinstance(c.get("text"), str)
            for c in extra):
        raise InvalidRequest("'input_extra' must be a list of {'filename': str, 'text': str}", param="input_extra")
    return [{"filename": c.get("filename", ""), "text": c["text"]} for c in extra]


def completion_args(body: Any) -> tuple[dict, Any, bool]:
    """POST /completion: `prompt` as text, token ids, or both mixed; `n_predict` (-1: the default
    limit), `cache_prompt`. Returns the request in /v1/completions' terms (checked there), the
    prompt's tokens as a function of the core, and whether the cache may be reused."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # one prompt in a list
    if isinstance(prompt, str):
        parts = [prompt]
    elif isinstance(prompt, list) and any(type(p) is int for p in prompt) and \
            all(type(p) is int or isinstance(p, str) for p in prompt):  # (only strings: several prompts)
        parts = prompt
    else:
        raise InvalidRequest("'prompt' must be a string, a list of token ids, or a list mixing both "
                             "(one prompt per request)", param="prompt")
    if not any(parts):
        raise InvalidRequest("the prompt is empty", param="prompt")

    def tokens(core) -> list[int]:
        # as llama-server: special tokens written in the text are read as such, BOS first
        out: list[int] = []
        for part in parts:
            if isinstance(part, str):
                out += core.model.tokenize(part, add_special=not out, parse_special=True)
            elif 0 <= part < core.model.n_vocab:
                out.append(part)
            else:
                raise InvalidRequest(f"token id {part} is not one of the model's", param="prompt")
        return out

    translated = {k: v for k, v in body.items() if k not in ("prompt", "n_predict", "logprobs", "suffix")}
    translated["prompt"] = "-"  # the tokens above are the prompt
    n_predict = body.get("n_predict", -1)
    if type(n_predict) is not int or n_predict < -1:
        raise InvalidRequest("'n_predict' must be an integer, -1 for no limit of the request's own", param="n_predict")
    if n_predict > 0:
        translated.setdefault("max_tokens", n_predict)
    elif n_predict == 0:  # a warm-up: read the prompt, answer nothing
        translated["max_tokens"] = 1
    cache_prompt = body.get("cache_prompt", True)
    if not isinstance(cache_prompt, bool):
        raise InvalidRequest("'cache_prompt' must be true or false", param="cache_prompt")
    return translated, tokens, cache_prompt


def stop_type(done) -> str:
    return {"stop": "eos", "length": "limit", "tool_calls": "eos"}.get(done.finish_reason, "none")


def timings(done) -> dict:
    """llama-server's timings: what was read (cache_n reused, prompt_n computed) and generated."""
    usage = done.usage
    prompt_n = max(usage.prompt_tokens - usage.cached_tokens, 0)
    prompt_ms = done.t_prefill_s * 1000
    predicted_n = usage.completion_tokens
    predicted_ms = max(done.t_total_s - done.t_prefill_s, 0.0) * 1000
    return {"cache_n": usage.cached_tokens, "prompt_n": prompt_n, "prompt_ms": prompt_ms,
            "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else 0.0,
            "prompt_per_second": prompt_n / prompt_ms * 1000 if prompt_ms else 0.0,
            "predicted_n": predicted_n, "predicted_ms": predicted_ms,
            "predicted_per_token_ms": predicted_ms / predicted_n if predicted_n else 0.0,
            "predicted_per_second": predicted_n / predicted_ms * 1000 if predicted_ms else 0.0}


def completion_response(done, model: str, warm_up: bool = False, kvside: dict | None = None) -> dict:
    """The final /completion (and /infill) object; `content` is empty in a stream's last event
    and for a warm-up (n_predict 0)."""
    text = "" if warm_up else done.text
    usage = done.usage
    out = {"index": 0, "content": text, "tokens": [], "id_slot": -1, "stop": True, "model": model,
           "tokens_predicted": 0 if warm_up else usage.completion_tokens, "tokens_evaluated": usage.prompt_tokens,
           "generation_settings": done.params, "has_new_line": "\n" in text, "truncated": False,
           "stop_type": "limit" if warm_up else stop_type(done), "stopping_word": "",
           "tokens_cached": usage.prompt_tokens + (0 if warm_up else usage.completion_tokens),
           "timings": timings(done)}
    if kvside:
        out["kvside"] = kvside
    return out


class LlamaServerFront:
    """The handlers of llama-server's own endpoints, over the daemon's plumbing; /infill shares
    /v1/completions' text path."""

    def __init__(self, daemon):
        self.d = daemon

    def routes(self) -> list[Route]:
        return [
            Route("/props", self.props, methods=["GET"]),
            Route("/tokenize", self.tokenize, methods=["POST"]),
            Route("/detokenize", self.detokenize, methods=["POST"]),
            Route("/apply-template", self.apply_template, methods=["POST"]),
            Route("/completion", self.completion, methods=["POST"]),
            Route("/completions", self.completion, methods=["POST"]),
            Route("/infill", self.infill, methods=["POST"]),
        ]

    async def props(self, request: HTTPRequest) -> JSONResponse:
        out = props(self.d.info, self.d.template, vars(SamplingParams()))
        out["embeddings"] = self.d.embedding or {
            "model": "the chat model", "pooling": "mean", "n_embd": self.d.info["model"]["n_embd"],
            "trained_for_embeddings": False,
            "note": "no --embedding-model: /v1/embeddings mean-pools the chat model's hidden states, fine for "
                    "similarity within this model, not a retrieval embedding"}
        return JSONResponse(out)

    # A body's `model` picks any installed model (as llama-server's router mode does); without
    # one, the daemon's first model answers.
    async def _engine(self, body: Any):
        model = body.get("model") if isinstance(body, dict) else None
        if model is not None and not isinstance(model, str):
            raise InvalidRequest("'model' must be a string", param="model")
        return (await self.d.engine_for(model))[1]

    async def tokenize(self, request: HTTPRequest) -> JSONResponse:
        body = await self.d._json(request)
        args = tokenize_args(body)
        engine = await self._engine(body)
        return JSONResponse(await asyncio.to_thread(engine.call, lambda core: tokenize(core, *args)))

    async def detokenize(self, request: HTTPRequest) -> JSONResponse:
        body = await self.d._json(request)
        engine = await self._engine(body)
        n_vocab = await asyncio.to_thread(engine.call, lambda core: core.model.n_vocab)
        tokens = detokenize_args(body, n_vocab)
        text = await asyncio.to_thread(engine.call, lambda core: core.model.detokenize(tokens, special=True))
        return JSONResponse({"content": text})

    async def apply_template(self, request: HTTPRequest) -> JSONResponse:
        body = await self.d._json(request)
        messages, tools = apply_template_args(body)
        engine = await self._engine(body)
        return JSONResponse(await asyncio.to_thread(engine.call, lambda core: apply_template(core, messages, tools)))

    async def completion(self, request: HTTPRequest):
        body = await self.d._json(request)
        translated, tokens, cache_prompt = completion_args(body)
        req = oa.parse_completion(translated)
        req.served, engine = await self.d.engine_for(req.model)
        return await self.d._text_request(request, req, "llama", tokens=tokens, reuse=cache_prompt,
                                          warm_up=body.get("n_predict") == 0, engine=engine)

    async def infill(self, request: HTTPRequest):
        body = await self.d._json(request)
        if not isinstance(body, dict):
            raise InvalidRequest("the request body must be a JSON object")
        prefix, suffix = body.get("input_prefix", ""), body.get("input_suffix", "")
        middle = body.get("prompt", "")
        if not all(isinstance(v, str) for v in (prefix, suffix, middle)):
            raise InvalidRequest("'input_prefix', 'input_suffix' and 'prompt' must be strings")
        extra = infill_extra(body)
        translated = dict(body, prompt=prefix, suffix=suffix)
        if "n_predict" in body and "max_tokens" not in body:
            if body["n_predict"] == 0:  # llama.vscode warms the cache with n_predict 0: read, answer nothing
                translated["max_tokens"] = 1
            else:
                translated["max_tokens"] = body["n_predict"]
        translated.pop("logprobs", None)
        req = oa.parse_completion(translated)
        req.served, engine = await self.d.engine_for(req.model)
        for key in ("n_indent", "t_max_predict_ms"):
            value = body.get(key, 0)
            if type(value) is not int or value < 0:
                raise InvalidRequest(f"'{key}' must be a whole number >= 0", param=key)
            setattr(req.reply, key, value)
        warm_up = body.get("n_predict") == 0
        n_predict = req.params.get("max_tokens", 0)
        return await self.d._text_request(request, req, "llama", tokens=lambda core: prompt.fim_tokens(
            core, prefix, suffix, middle, extra, n_predict), warm_up=warm_up,
            reuse=body.get("cache_prompt", True) is not False, engine=engine)
