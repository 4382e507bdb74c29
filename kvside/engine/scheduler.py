"""The generations: every reply in progress, one per busy session. Each step packs the next tokens
of every generation (one token for those decoding, a share of the batch for those prefilling) into
one llama_decode, then samples each one's next token from its own row of logits. Runs on the
engine thread only, inside Core."""

from __future__ import annotations

import codecs
import time
from dataclasses import dataclass, field

from kvside.engine import checkpoints, edits, prompt
from kvside.engine.costs import SMALL_BATCH
from kvside.engine.decode import decode_error
from kvside.engine.reply import ReplyReader, ReplySpec, constraint
from kvside.engine.sampling import Sampler, SamplingParams, StopMatcher
from kvside.engine.session import MSG_DROPPED, MSG_LIVE, Message, Session
from kvside.engine.stream import Completion, Event, Stream, Usage
from kvside.errors import EditError, InvalidRequest, KvsideError

PREFILL = "prefill"
DECODE = "decode"


@dataclass
class _Gen:
    """A generation in progress."""

    session: Session
    stream: Stream
    params: SamplingParams
    sampler: Sampler
    stops: StopMatcher
    todo: list[int]  # prompt tokens still to decode
    todo_msg: list[int]  # their message ids
    reply_id: int
    mode: str  # "chat" or "text"
    history: list[dict]  # template history before the reply
    rollback: dict
    rollback_first_msg: int = -1  # the turn's first new message: protected from auto-roll
    phase: str = PREFILL
    next_token: int = -1
    tokens: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )
    usage: Usage = field(default_factory=Usage)
    t_start: float = field(default_factory=time.perf_counter)
    t_first: float = 0.0
    notices: list[dict] = field(default_factory=list)
    spec: ReplySpec | None = None
    reader: ReplyReader | None = None  # splits a chat reply into content, reasoning and tool calls
    logprobs: list[dict] = field(default_factory=list)  # per token, when asked for
    unsent_logprobs: int = 0  # of those, not yet carried by an event
    # ledger lengths at which the prefill stops for a context checkpoint (checkpoints.marks)
    marks: list[int] = field(default_factory=list)


class Scheduler:
    def __init__(self, core):
        self.core = core
        self.gens: list[_Gen] = []
        self._last_big = False

    @property
    def active(self) -> bool:
        return bool(self.gens)

    def start_chat(self, name: str, messages: list[dict], params: SamplingParams, stream: Stream,
                   spec: ReplySpec | None = None, shared: int = 0, recheck: list[int] = (),
                   again: bool = False) -> None:
        """`shared`: the session is new and its cache already holds the first `shared` tokens of
        this prompt (binding.share_prefix); they are not read again. `recheck`: held messages the
        client changed in a way the template may render differently (edits.restyle). `again`: no
        messages, another reply to the session's last one (a regenerate: the client's history
        without the reply it got, which binding dropped)."""
        s = self.core.get(name)
        spec = spec or ReplySpec()
        new = []
        next_id = s.next_message_id()
        for i, m in enumerate(messages):
            role, content = m.get("role"), m.get("content")
            if role not in ("system", "user", "assistant", "tool") or not isinstance(content, str):
                raise InvalidRequest("each message needs a role (system/user/assistant/tool) and string content")
            new.append(Message.from_request(next_id + i, m))
        if again:
            last = next((m for m in reversed(s.messages) if m.kind in ("chat", "tool") and m.state == "live"), None)
            if new or last is None or last.role not in ("user", "tool") or s.pending:
                raise KvsideError("another reply needs a session whose last message is the client's")  # a bug
        elif not new:
            raise InvalidRequest("no messages to send")
        elif not any(m.content.strip() or m.tool_calls for m in new):
            raise InvalidRequest("the message is empty")
        if spec.tools:
            if not s.messages:
                s.tools = list(spec.tools)
            elif s.tools != spec.tools:
                raise InvalidRequest(f"session {name!r} was started with other tools; tool definitions are part of "
                                     "its cached prompt, so start a new session for a new set", param="tools")
        if new and not any(m.state == MSG_LIVE for m in s.messages) and (new[0].role == "system" or s.tools):
            # the system prompt is never rolled away, nor the turn that carries the tool definitions
            new[0].pinned = True
        history = s.template_history() + [m.as_template() for m in new]
        # a template that renders earlier turns differently once these follow: edit them first
        restyled = edits.restyle(self.core, s, new, recheck)
        pieces = prompt.chat_pieces(self.core, s, new, generation=True, fresh=True if shared else None,
                                    restyled=restyled)
        reply_id = next_id + len(new)
        pieces[-1] = (reply_id, pieces[-1][1])
        gen_prompt = self.core.model.detokenize(pieces[-1][1], special=True)
        if shared:  # held already: drop them from what is read
            if s.ledger.tok != [t for _, toks in pieces for t in toks][:shared]:
                raise KvsideError("the shared prefix does not match the prompt")  # a bug, never the client's
            pieces = _drop_front(pieces, shared)
        notice = self._restyled_notice(restyled.report) if restyled.report else None
        self._start(s, pieces, params, stream, reply_id, "chat", history, new, spec,
                    think=gen_prompt.rstrip().endswith("<think>"), notices=[notice] if notice else [],
                    reread=[m for m, _ in restyled.reread])
        if restyled.report:  # cells the edit decoded were computed for this request, not reused
            self.discount_cached(s, restyled.report["inserted"] + restyled.report["recomputed"])

    @staticmethod
    def _restyled_notice(report: dict) -> dict:
        text = (f"the chat template renders {len(report['restyled']) + len(report['reread_messages'])} earlier "
                f"turn(s) differently now (a reasoning model's template drops their reasoning): "
                f"{report['removed']} cells removed in place")
        if report["reread_messages"]:
            text += f", {len(report['reread_messages'])} turn(s) read again"
        return {"kind": "restyled", "strategy": "edit", **{k: report[k] for k in
                ("restyled", "removed", "inserted", "recomputed", "reread_messages")}, "message": text}

    def start_text(self, name: str, text: str, params: SamplingParams, stream: Stream,
                   spec: ReplySpec | None = None) -> None:
        s = self.core.get(name)
        if not text:
            raise InvalidRequest("the prompt is empty")
        msg_id = s.next_message_id()
        new = [Message(msg_id, "user", text, kind="text")]
        pieces = prompt.text_pieces(self.core, s, msg_id, text)
        self._start(s, pieces, params, stream, msg_id + 1, "text", [], new, spec)

    def start_tokens(self, name: str, tokens: list[int], params: SamplingParams, stream: Stream,
                     spec: ReplySpec | None = None) -> None:
        """Continue a session from raw tokens (fill-in-the-middle prompts carry special tokens)."""
        s = self.core.get(name)
        if not tokens:
            raise InvalidRequest("the prompt is empty")
        msg_id = s.next_message_id()
        new = [Message(msg_id, "user", "", kind="text")]
        pieces = [(msg_id, list(tokens))]
        self._start(s, pieces, params, stream, msg_id + 1, "text", [], new, spec)

    def _start(self, s, pieces, params, stream, reply_id, mode, history, new, spec=None, think=False,
               notices: list[dict] = (), reread: list[int] = ()) -> None:
        todo = [t for _, toks in pieces for t in toks]
        todo_msg = [m for m, toks in pieces for _ in toks]
        notices = list(notices)
        for n in notices:
            stream.put(Event("notice", text=n["message"], data=n))
        rolled = edits.auto_roll(self.core, s, len(todo) + 1, protect={m.id for m in new})
        if rolled:
            notices.append(self._notice(stream, rolled))
        rebuilt = not self.core.mem.window_ok(s.seq, s.ledger.next_pos)
        restored = 0
        if rebuilt:
            # a sliding-window or recurrent cache cannot go on from here (an edit went back
            # before what it still holds): the session is read again from its latest context
            # checkpoint that still applies, else from its first token
            t0 = time.perf_counter()
            why = self.core.mem.window_lost(s.ledger.next_pos)
            restored = edits.reprefill(self.core, s)
            whence = f"from a checkpoint after {restored} tokens" if restored else "from the start"
            s.log("rebuilt", reason=f"{why}: read again {whence}", tokens=len(s.ledger),
                  from_checkpoint=restored, t_s=round(time.perf_counter() - t0, 4))
            text = (f"{why}: {len(s.ledger) - restored} of the session's {len(s.ledger)} tokens were read "
                    f"again {whence}")
            notices.append({"kind": "rebuilt", "strategy": "reprefill", "from_checkpoint": restored,
                            "message": text})
            stream.put(Event("notice", text=text, data=notices[-1]))
        self.core.room_check(s, len(todo))
        rollback = {
            "start": s.ledger.next_pos,
            "n_messages": len(s.messages),
            "pending": list(s.pending),
            "pending_msg": s.pending_msg,
            "closing": s.closing,
            "reread": list(reread),  # held turns whose cells this prompt reads again
        }
        s.messages.extend(new)
        self.core.clear_pending(s)
        rule = constraint(spec, self.core.tool_format, think) if spec is not None else None
        sampler = Sampler(params, s.ledger.tok + todo, self.core.model.n_vocab, vocab=self.core.model.vocab,
                          constraint=rule, tokenize=self.core.model.tokenize)
        gen = _Gen(s, stream, params, sampler, StopMatcher(params.stop), todo, todo_msg, reply_id, mode, history, rollback)
        gen.spec = spec
        if mode == "chat":
            calls = spec is not None and spec.calls_allowed
            gen.reader = ReplyReader(self.core.tool_format if calls else None, think=think,
                                     names={t["function"]["name"] for t in spec.tools_for_choice()} if calls else None,
                                     triggers=rule.patterns if rule is not None and rule.lazy else None)
        gen.rollback_first_msg = new[0].id if new else -1
        gen.notices.extend(notices)
        gen.usage.cached_tokens = restored if rebuilt else len(s.ledger)
        gen.marks = checkpoints.marks(self.core, s, todo_msg)
        gen.usage.prompt_tokens = len(s.ledger) + len(todo)
        stream.usage = gen.usage
        s.busy = True
        s.last_used = time.time()
        self.gens.append(gen)

    def discount_cached(self, s: Session, n: int) -> None:
        """Count n of s's cells as computed for the reply just started, not reused (an edit
        decoded them into the cache for this request)."""
        for g in self.gens:
            if g.session is s:
                g.usage.cached_tokens = max(g.usage.cached_tokens - n, 0)

    def step(self) -> None:
        """One llama_decode over every active generation."""
        for g in list(self.gens):
            if g.stream.cancelled:
                self._finish(g, "cancelled")
        if not self.gens:
            return
        self.core.batch.clear()
        slots = self._plan_big() if not self._last_big else None
        self._last_big = bool(slots)
        if not slots:
            slots = self._plan_small()
        if not slots:  # only big prefills are waiting
            slots = self._plan_big()
            self._last_big = True
        if not slots:
            for g in [g for g in self.gens if g.phase == PREFILL and not g.todo]:
                self._fail(g, InvalidRequest("nothing to decode"))
            return
        rc = self.core.llama_decode(self.core.batch)
        if rc != 0:
            error = decode_error(rc)
            for g, _, _, _ in slots:
                self.core.mem.rm(g.session.seq, g.session.ledger.next_pos, -1)
                self._fail(g, error)
            return
        for g, toks, msgs, idx in slots:
            for tok, msg in _runs(toks, msgs):
                g.session.ledger.append(tok, msg)
            if g.marks and len(g.session.ledger) == g.marks[0]:
                g.marks.pop(0)
                checkpoints.take(self.core, g.session)
            if idx >= 0:
                if g.phase == PREFILL:
                    g.phase = DECODE
                    g.t_first = time.perf_counter()
                token = g.sampler.sample(self.core.ctx, idx)
                if g.spec is not None and g.spec.logprobs:
                    self._logprob(g, idx, token)
                self._on_token(g, token)

    # llama.cpp's CPU matmul switches kernels at 64 tokens per ubatch (measured): batches below
    # that give bit-identical rows whatever else they hold, batches above differ in rounding. So
    # a prefill chunk of 64 tokens or more is decoded alone, and small work (decode steps, short
    # prompt tails) is packed only while the batch stays under 64: a session's output then does
    # not depend on what other sessions are doing.
    def _plan_big(self) -> list:
        for g in self.gens:
            if g.phase == PREFILL and len(g.todo) >= SMALL_BATCH:
                self.gens.remove(g)
                self.gens.append(g)  # round-robin among long prompts
                return [self._add_prefill(g, self._prefill_size(g, self.core.n_batch))]
        return []

    def _plan_small(self) -> list:
        slots = []
        for g in self.gens:
            if g.phase == DECODE and self.core.batch.n + 1 < SMALL_BATCH:
                idx = self.core.batch.add(g.next_token, g.session.ledger.next_pos, g.session.seq, True)
                slots.append((g, [g.next_token], [g.reply_id], idx))
        for g in self.gens:
            n = self._prefill_size(g, len(g.todo))
            if g.phase == PREFILL and 0 < n and self.core.batch.n + n < SMALL_BATCH:
                slots.append(self._add_prefill(g, n))
        return slots

    @staticmethod
    def _prefill_size(g: _Gen, most: int) -> int:
        """How many of g's prompt tokens the next chunk takes: at most `most`, and not past its
        next checkpoint."""
        n = min(len(g.todo), most)
        return min(n, g.marks[0] - len(g.session.ledger)) if g.marks else n

    def _add_prefill(self, g: _Gen, n: int):
        pos0 = g.session.ledger.next_pos
        idx = -1
        for i in range(n):
            last = i == n - 1 and n == len(g.todo)
            j = self.core.batch.add(g.todo[i], pos0 + i, g.session.seq, last)
            idx = j if last else idx
        slot = (g, g.todo[:n], g.todo_msg[:n], idx)
        del g.todo[:n], g.todo_msg[:n]
        return slot

    def _on_token(self, g: _Gen, token: int) -> None:
        g.tokens.append(token)
        g.usage.completion_tokens = len(g.tokens)
        if self.core.model.is_eog(token) and not g.params.ignore_eos:
            return self._finish(g, "stop")
        # a reply that may call tools is read with its special tokens ([TOOL_CALLS], <|channel|>...)
        special = g.reader is not None and g.reader.fmt is not None
        text = g.decoder.decode(self.core.model.piece(token, special=special))
        if g.reader is not None:
            g.reader.sampled(text)
        emit, hit = g.stops.feed(text)
        cut = indent_cut("".join(g.text) + emit, g.spec.n_indent) if emit and g.spec and g.spec.n_indent else None
        if cut is not None:
            emit = emit[:max(0, cut - sum(map(len, g.text)))]
        if emit:
            g.text.append(emit)
            self._emit(g, emit)
        if hit:
            return self._finish(g, "stop", stop_hit=True)
        if cut is not None or len(g.tokens) >= g.params.max_tokens:
            return self._finish(g, "length")
        if g.spec and g.spec.t_max_predict_ms and g.t_first and any("\n" in t for t in g.text) and \
                time.perf_counter() - g.t_first > g.spec.t_max_predict_ms / 1000:
            return self._finish(g, "length")
        if g.session.ledger.next_pos + 1 >= self.core.n_ctx:
            protect = set(range(g.rollback_first_msg, g.reply_id + 1))
            try:
                rolled = edits.auto_roll(self.core, g.session, 1 + self.core.n_ctx // 8, protect=protect)
            except KvsideError as exc:
                # the reply so far stays in the session; the client learns why it stopped
                return self._finish(g, "error", error=EditError(f"the window is full and rolling it failed: {exc.message}"))
            if not rolled or g.session.ledger.next_pos + 1 >= self.core.n_ctx:
                return self._finish(g, "length")
            g.notices.append(self._notice(g.stream, rolled))
        g.next_token = token

    def _emit(self, g: _Gen, text: str) -> None:
        """Send what the model wrote: as is, or through the reply reader as content, reasoning
        and tool-call deltas. Log-probabilities not yet sent ride on the next event."""
        if g.reader is None:
            return g.stream.put(Event("text", text, data=self._take_logprobs(g)))
        for d in g.reader.feed(text):
            self._put_delta(g, d)

    def _put_delta(self, g: _Gen, d) -> None:
        if d.kind == "content":
            g.stream.put(Event("text", d.text, data=self._take_logprobs(g)))
        elif d.kind == "reasoning":
            g.stream.put(Event("reasoning", d.text))
        elif d.kind == "call":
            g.stream.put(Event("tool_call", d.text, data={"index": d.index, "id": d.call_id, "name": d.text}))
        else:
            g.stream.put(Event("tool_args", d.text, data={"index": d.index, "id": d.call_id}))

    def _logprob(self, g: _Gen, idx: int, token: int) -> None:
        lp, top = g.sampler.logprobs(self.core.ctx, idx, token, g.spec.top_logprobs)
        piece = self.core.model.piece
        g.logprobs.append({"token": piece(token).decode("utf-8", errors="replace"), "logprob": lp,
                           "bytes": list(piece(token)),
                           "top_logprobs": [{"token": piece(t).decode("utf-8", errors="replace"), "logprob": p,
                                             "bytes": list(piece(t))} for t, p in top]})
        g.unsent_logprobs += 1

    def _take_logprobs(self, g: _Gen) -> dict:
        if not g.unsent_logprobs:
            return {}
        out = g.logprobs[len(g.logprobs) - g.unsent_logprobs :]
        g.unsent_logprobs = 0
        return {"logprobs": out}

    def _notice(self, stream: Stream, report: dict) -> dict:
        notice = {"kind": "prune" if report.get("strategy") == "prune_tools" else "roll", **report}
        if report.get("strategy") == "close_gaps":
            text = f"context full: closed {report['gaps_closed']} holes left by masks"
        elif report.get("strategy") == "prune_tools":
            text = (f"context full: masked {len(report['pruned_messages'])} old tool results "
                    f"({report['masked']} tokens); later turns kept their cache")
        else:
            text = f"context full: rolled {report['dropped']} tokens ({report['strategy']})"
        notice["message"] = text
        stream.put(Event("notice", text=text, data=notice))
        return notice

    def _finish(self, g: _Gen, reason: str, stop_hit: bool = False, error: KvsideError | None = None) -> None:
        """End g: its reply becomes a message of the session, and the stream gets the completion
        (or `error`, after the text so far)."""
        s = g.session
        if reason == "cancelled" and g.phase == PREFILL:
            self._undo(g)
            completion = Completion(s.name, "", [], "cancelled", g.usage, t_total_s=time.perf_counter() - g.t_start)
            self._release(g)
            g.stream.finish(completion)
            return
        if not stop_hit:
            tail = g.decoder.decode(b"", final=True) + g.stops.flush()
            if tail:
                g.text.append(tail)
                self._emit(g, tail)
        raw = text = "".join(g.text)
        reasoning, calls = "", []
        if g.reader is not None:
            parsed, deltas = g.reader.finish()
            for d in deltas:
                self._put_delta(g, d)
            text, reasoning = parsed.content, parsed.reasoning
            calls = g.reader.openai_calls(parsed.calls)
            if calls and reason == "stop":
                reason = "tool_calls"
        s.pending = g.tokens[-1:]
        s.pending_msg = g.reply_id
        if g.mode == "chat":
            reply = Message(g.reply_id, "assistant", text, tool_calls=calls or None, reasoning=reasoning)
            s.messages.append(reply)
            s.closing, keep_eog = prompt.closing(self.core, g.history, reply, s.pending, raw=raw, tools=s.tools)
            if s.pending and self.core.model.is_eog(s.pending[0]) and not keep_eog:
                s.pending = []
        else:
            s.messages.append(Message(g.reply_id, "assistant", text, kind="text"))
            if s.pending and self.core.model.is_eog(s.pending[0]):
                s.pending = []
        now = time.perf_counter()
        n_dec = max(len(g.tokens) - 1, 0)
        completion = Completion(
            session=s.name,
            text=text,
            tokens=list(g.tokens),
            finish_reason=reason,
            usage=g.usage,
            t_prefill_s=(g.t_first or now) - g.t_start,
            t_total_s=now - g.t_start,
            decode_tok_s=n_dec / (now - g.t_first) if g.t_first and n_dec and now > g.t_first else 0.0,
            notices=g.notices,
            params=vars(g.params),
            reasoning=reasoning,
            tool_calls=calls,
            logprobs=g.logprobs if g.spec is not None and g.spec.logprobs else None,
        )
        self._release(g)
        self.core.after_reply(s)  # with a shared folder, saved before the client hears the end
        if error is not None:
            g.stream.fail(error)
        else:
            g.stream.finish(completion)

    def stop_all(self, error: KvsideError) -> None:
        """End every generation with `error` as _fail does (the engine is closing)."""
        for g in list(self.gens):
            self._fail(g, error)

    def fail_all(self, error: KvsideError) -> None:
        """End every generation with `error`; their sessions are rebuilt from their ledgers, so
        none is left between states."""
        for g in list(self.gens):
            if g in self.gens:
                self.gens.remove(g)
            g.sampler.close()
            g.session.busy = False
            try:
                edits.reprefill(self.core, g.session)
            except KvsideError:
                pass  # reprefill cleared the session's cache and ledger; it starts empty
            self.core.ready.extend(g.session.backlog)
            g.session.backlog.clear()
            g.stream.fail(error)

    def _undo(self, g: _Gen) -> None:
        s, rb = g.session, g.rollback
        self.core.mem.rm(s.seq, rb["start"], -1)
        s.ledger.truncate(rb["start"])
        del s.messages[rb["n_messages"] :]
        s.pending, s.pending_msg, s.closing = rb["pending"], rb["pending_msg"], rb["closing"]
        for m in s.messages:
            if m.id in rb["reread"] and m.id not in s.ledger.msg:
                m.state = MSG_DROPPED  # its cells went with the restyle: a client that sends it again gets it read

    def _fail(self, g: _Gen, error: KvsideError) -> None:
        """End g with an error. A prompt not fully read is undone; a reply already under way is
        kept as far as it got, so the ledger and the messages still agree."""
        if g.phase == PREFILL:
            self._undo(g)
            self._release(g)
            g.stream.fail(error)
        else:
            self._finish(g, "error", error=error)

    def _release(self, g: _Gen) -> None:
        g.sampler.close()
        if g in self.gens:
            self.gens.remove(g)
        s = g.session
        s.busy = False
        s.last_used = time.time()
        self.core.ready.extend(s.backlog)
        s.backlog.clear()
        if s.temporary and s.name in self.core.sessions and not self.ready_for(s.name):
            self.core.delete_session(s.name, forget_file=True)
        self.core.session_freed()

    def ready_for(self, name: str) -> bool:
        """Whether work for session `name` waits in the ready list."""
        return any(item[1] == name for item in self.core.ready)


def _runs(tokens: list[int], msgs: list[int]):
    """Group consecutive tokens by message id."""
    start = 0
    for i in range(1, len(tokens) + 1):
        if i == len(tokens) or msgs[i] != msgs[start]:
            yield tokens[start:i], msgs[start]
            start = i


def indent_cut(text: str, n_indent: int) -> int | None:
    """Where llama-server's n_indent rule ends a completion: at the first character after the
    indentation of a line (after the first) indented less than n_indent, or None."""
    nl = text.find("\n")
    while nl >= 0:
        pos = nl + 1
        while pos < len(text) and text[pos] in " \t":
            pos += 1
        if pos < len(text) and pos - (nl + 1) < n_indent:
            return pos
        nl = text.find("\n", nl + 1)
    return None


def _drop_front(pieces: list[tuple[int, list[int]]], n: int) -> list[tuple[int, list[int]]]:
    """The pieces without their first n tokens (the last piece, the reply's, always stays)."""
    out = []
    for i, (msg_id, toks) in enumerate(pieces):
        if n >= len(toks) and i < len(pieces) - 1:
            n -= len(toks)
            continue
        out.append((msg_id, toks[n:]))
        n = 0
    return out
