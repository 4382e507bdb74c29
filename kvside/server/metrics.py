"""GET /metrics in Prometheus' text format (prometheus_client): requests by route and status,
prompt tokens computed against reused, cache edits by kind and strategy, time to first token
and decode rate, and the sessions resident and on disk. One registry per daemon."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

ROUTES = {"/health", "/v1/models", "/models", "/v1/chat/completions", "/v1/completions", "/infill", "/completion", "/completions",
          "/v1/embeddings", "/api/embed", "/api/embeddings", "/props",
          "/tokenize", "/detokenize", "/apply-template", "/api/version", "/api/tags", "/api/ps", "/api/show",
          "/api/chat", "/api/generate", "/api/pull", "/api/delete", "/kvside/sessions", "/kvside/restore", "/metrics",
          "/v1/responses", "/responses", "/v1/responses/input_tokens", "/responses/input_tokens", "/v1/messages",
          "/v1/messages/count_tokens"}


_SESSION_ACTIONS = {"roll", "mask", "compact", "prune", "erratum", "fork", "save", "strategy", "attach", "file"}


def route_of(path: str) -> str:
    """A route label with session names taken out, so the label set stays small."""
    if path in ROUTES:
        return path
    for base in ("/v1/responses/", "/responses/"):  # a stored response, by id
        if path.startswith(base):
            return base + "{id}" + ("/input_items" if path.endswith("/input_items") else "")
    if path.startswith("/kvside/sessions/"):
        rest = path[len("/kvside/sessions/"):].split("/")
        if len(rest) == 1:
            return "/kvside/sessions/{name}"
        if len(rest) == 2:
            return "/kvside/sessions/{name}/" + (rest[1] if rest[1] in _SESSION_ACTIONS else "{other}")
    return "other"


class CountRequests:
    """ASGI middleware outside the guard: every answer is counted, refusals included."""

    def __init__(self, app, metrics: "Metrics"):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = route_of(scope["path"])

        async def counted(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(route, str(message["status"])).inc()
            await send(message)

        return await self.app(scope, receive, counted)


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("kvside_requests", "HTTP requests answered", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("kvside_prompt_tokens", "Prompt tokens of replies: read now (computed) or "
                                     "found in the cache (reused)", ["kind"], registry=r)
        self.completion_tokens = Counter("kvside_completion_tokens", "Tokens generated", registry=r)
        self.replies = Counter("kvside_replies", "Replies by how they ended", ["finish_reason"], registry=r)
        self.edits = Counter("kvside_edits", "Cache edits by kind and strategy", ["edit", "strategy"], registry=r)
        self.ttft = Histogram("kvside_time_to_first_token_seconds", "From request to first sampled token",
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60), registry=r)
        self.decode_rate = Histogram("kvside_decode_tokens_per_second", "Decode rate of a reply",
                                     buckets=(5, 10, 20, 40, 80, 160, 320, 640, 1280), registry=r)
        self.in_flight = Gauge("kvside_requests_in_flight", "Requests being answered", registry=r)
        # per loaded model: each has an engine of its own (sessions, decode time, measured rates)
        self.sessions = Gauge("kvside_sessions", "Sessions by model and where they are", ["model", "where"], registry=r)
        self.decode_seconds = Gauge("kvside_llama_decode_seconds", "Wall time the model's engine spent inside "
                                    "llama_decode since it started (all else in a request is kvside's overhead)",
                                    ["model"], registry=r)
        # the cost model's measured rates (engine/costs.py): what edits are weighed with
        self.token_cost = Gauge("kvside_decode_ms_per_token", "Measured llama_decode cost per token, by batch "
                                "class (small: under 64 tokens) and cells in the cache", ["model", "batch", "depth"],
                                registry=r)
        self.shift_cost = Gauge("kvside_kshift_ms", "Measured cost of applying a K-shift (re-rotating the cache)",
                                ["model"], registry=r)

    def reply(self, done, note: dict | None = None) -> None:
        """A finished generation (engine Completion) and what binding did for it."""
        usage = done.usage
        self.prompt_tokens.labels("reused").inc(usage.cached_tokens)
        self.prompt_tokens.labels("computed").inc(max(usage.prompt_tokens - usage.cached_tokens, 0))
        self.completion_tokens.inc(usage.completion_tokens)
        self.replies.labels(done.finish_reason).inc()
        if done.t_prefill_s and done.finish_reason != "cancelled":
            self.ttft.observe(done.t_prefill_s)
        if done.decode_tok_s:
            self.decode_rate.observe(done.decode_tok_s)
        for notice in done.notices:  # automatic rolls and gap closes during the reply
            self.edits.labels("auto-" + notice.get("kind", "roll"), str(notice.get("strategy", ""))).inc()
        if note and note.get("dropped_messages"):
            self.edits.labels("mask", "shift").inc()  # the client dropped messages: a suffix-cache edit
        if note and note.get("moved_runs"):
            self.edits.labels("text-move", "shift").inc()  # runs of a text prompt moved into place

    def edit(self, kind: str, report) -> None:
        strategy = report.get("strategy", "") if isinstance(report, dict) else ""
        self.edits.labels(kind, str(strategy)).inc()

    def render(self, in_flight: int, models: list[tuple[str, list[dict], float, dict | None]]) -> tuple[bytes, str]:
        """`models`: (name, sessions, seconds in llama_decode, measured costs) of each loaded model;
        a model that unloaded since the last scrape leaves no series behind."""
        self.in_flight.set(in_flight)
        for gauge in (self.sessions, self.decode_seconds, self.token_cost, self.shift_cost):
            gauge.clear()
        for name, sessions, decode_seconds, costs in models:
            self.decode_seconds.labels(name).set(decode_seconds)
            for key, ms in (costs or {}).get("ms_per_token", {}).items():
                batch, depth = key.split("@")
                self.token_cost.labels(name, batch, depth).set(ms)
            if costs and costs.get("shift_ms") is not None:
                self.shift_cost.labels(name).set(costs["shift_ms"])
            self.sessions.labels(name, "resident").set(sum(1 for s in sessions if s.get("resident")))
            self.sessions.labels(name, "disk").set(sum(1 for s in sessions if not s.get("resident")))
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
