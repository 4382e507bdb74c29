"""`kvside chat`: a Textual chat with a live map of the KV cache.

Every reply streams into its own session's transcript: switching sessions mid-reply never moves
it. Esc stops the reply and keeps what is typed. Commands come as /slash commands or from the
palette (ctrl+p); each reports what it did."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.command import Hit, Hits, Provider
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.css.query import NoMatches
from textual.message import Message
from textual.widgets import Footer, Header, Label, ListItem, ListView, LoadingIndicator, Markdown, Static, TextArea

from kvside.errors import KvsideError
from kvside.tui.backend import Reply, drain
from kvside.tui.cachemap import CacheMap

HELP = """/new [NAME]  /rename NAME  /delete  /roll N [STRATEGY]  /compact [UP_TO]  /mask ID [close] [STRATEGY]
/retry  /fork [NAME]  /save [FILE]  /restore FILE [NAME]  /attach DOC [K|STRATEGY]  /help
/strategy shift|recompute:R|reprefill, and with the native patch values:R|values:all|select:F
/prune-tools N|off  (when the window fills, mask old tool results, keeping the last N, before rolling turns)
/fidelity [N]  (the last reply's first N tokens on this cache against a re-prefill of the same tokens: KL, top-1)"""


@dataclass
class Item:
    role: str
    text: str = ""
    widget: Markdown | None = None
    stream: object | None = None


@dataclass
class Chat:
    name: str
    items: list[Item] = field(default_factory=list)
    reply: Reply | None = None
    status: str = ""
    loaded: bool = True  # False for a saved session until it is opened (its transcript is fetched then)
    last: dict = field(default_factory=dict)  # how the last reply ended: finish reason, tokens, parameters


class PromptInput(TextArea):
    """Enter sends; Shift+Enter (or Ctrl+J) inserts a newline."""

    class Submitted(Message):
        def __init__(self, text: str):
            super().__init__()
            self.text = text

    async def _on_key(self, event) -> None:
        if event.key == "enter":
            event.prevent_default()
            event.stop()
            self.post_message(self.Submitted(self.text))
        elif event.key in ("shift+enter", "ctrl+j"):
            event.prevent_default()
            event.stop()
            self.insert("\n")


class ChatCommands(Provider):
    COMMANDS = [
        ("New session", "/new"), ("Retry: another answer to the last message", "/retry"),
        ("Fork session", "/fork"), ("Save session", "/save"),
        ("Compact: summarize earlier turns", "/compact"), ("Roll: drop 256 oldest tokens", "/roll 256"),
        ("Strategy: shift", "/strategy shift"), ("Strategy: recompute:64", "/strategy recompute:64"),
        ("Delete session", "/delete"), ("Help", "/help"),
    ]

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for title, command in self.COMMANDS:
            score = matcher.match(title)
            if score > 0:
                yield Hit(score, matcher.highlight(title), lambda c=command: self.app.run_command(c), help=command)


class ChatApp(App):
    TITLE = "kvside"
    CSS = """
    #sidebar { width: 24; border-right: solid $panel; }
    #log { height: 1fr; padding: 0 1; }
    .user { background: $boost; margin: 1 0 0 0; padding: 0 1; }
    .assistant { margin: 0 0 0 2; }
    #prompt { height: 5; }
    #status { height: 1; color: $text-muted; }
    #loading { height: 3; }
    """
    BINDINGS = [
        Binding("escape", "stop", "Stop reply"),
        Binding("ctrl+n", "new_session", "New session"),
        Binding("ctrl+y", "copy_reply", "Copy reply"),
        Binding("ctrl+q", "quit", "Quit"),
    ]
    COMMANDS = App.COMMANDS | {ChatCommands}

    def __init__(self, backend_factory, *, system: str | None = None, session: str | None = None):
        super().__init__()
        self.backend_factory = backend_factory
        self.backend = None
        self.system = system
        self.open_session = session  # --session NAME: open (or start) this one
        self.chats: dict[str, Chat] = {}
        self.current: str | None = None
        self.ready = False  # the backend answered and a session is open

    # -- layout ---------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal():
            yield ListView(id="sidebar")
            with Vertical():
                yield LoadingIndicator(id="loading")
                yield VerticalScroll(id="log")
                yield CacheMap(id="map")
                yield PromptInput(id="prompt")
                yield Static("loading the model...", id="status")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#prompt", PromptInput).disabled = True
        self.start_backend()

    @work(exclusive=True, group="startup")
    async def start_backend(self) -> None:
        try:
            self.backend = await self.backend_factory()
            saved = await self.backend.sessions()
        except Exception as exc:  # whatever stops the start is said in the app, never a silent hang
            self._startup_failed(exc)
            return
        self.query_one("#loading").display = False
        self.sub_title = self.backend.model_name
        for row in saved:
            await self._add_chat(Chat(row["name"], loaded=False))
        prompt = self.query_one("#prompt", PromptInput)
        prompt.disabled = False
        prompt.focus()
        wanted = self.open_session
        if wanted and wanted in self.chats:
            await self.switch_to(wanted)
        else:
            await self.new_chat(wanted)
        self.ready = self.current is not None

    def _startup_failed(self, exc: Exception) -> None:
        message = exc.message if isinstance(exc, KvsideError) else f"{type(exc).__name__}: {exc}"
        self.query_one("#loading").display = False
        self.query_one("#status", Static).update(f"could not start: {message} (ctrl+q quits)")
        self.notify(message, title="kvside could not start", severity="error", timeout=30)

    # -- sessions -------------------------------------------------------------------------------
    async def _add_chat(self, chat: Chat) -> None:
        self.chats[chat.name] = chat
        await self.query_one("#sidebar", ListView).append(ListItem(Label(chat.name), id=f"s-{_safe(chat.name)}"))

    async def new_chat(self, name: str | None) -> None:
        try:
            name = await self.backend.new_session(name, self.system)
        except KvsideError as exc:
            self.notify(exc.message, severity="error")
            self.query_one("#status", Static).update(f"no session: {exc.message} (ctrl+n tries again)")
            return
        await self._add_chat(Chat(name))
        await self.switch_to(name)

    async def switch_to(self, name: str) -> None:
        chat = self.chats[name]
        if not chat.loaded:  # a saved session: the engine brings it back, the transcript comes with it
            try:
                snapshot = await self.backend.cache_map(name)
            except KvsideError as exc:
                self.notify(f"cannot open {name}: {exc.message}", severity="error")
                return
            chat.items = [Item(m["role"], m["content"]) for m in snapshot["messages"]
                          if m["role"] in ("user", "assistant") and m.get("kind", "chat") == "chat"]
            chat.loaded = True
        self.current = name
        sidebar = self.query_one("#sidebar", ListView)
        for i, child in enumerate(sidebar.children):
            if child.id == f"s-{_safe(name)}":
                sidebar.index = i
        log = self.query_one("#log", VerticalScroll)
        await log.remove_children()
        for item in chat.items:
            item.widget, item.stream = None, None
            await self._mount_item(item)
        self.query_one("#status", Static).update(chat.status or f"session {name}")
        await self.refresh_map()

    async def _mount_item(self, item: Item) -> None:
        widget = Markdown(item.text, classes=item.role)
        item.widget = widget
        await self.query_one("#log", VerticalScroll).mount(widget)
        self.query_one("#log", VerticalScroll).scroll_end(animate=False)

    @on(ListView.Selected, "#sidebar")
    async def on_pick(self, event: ListView.Selected) -> None:
        label = event.item.query_one(Label)
        name = str(label.renderable) if hasattr(label, "renderable") else str(label.content)
        if name in self.chats and name != self.current:
            await self.switch_to(name)

    async def refresh_map(self) -> None:
        if self.backend is None or self.current is None:
            return
        try:
            snapshot = await self.backend.cache_map(self.current)
        except KvsideError:
            return
        self.query_one("#map", CacheMap).show(snapshot)

    # -- sending --------------------------------------------------------------------------------
    @on(PromptInput.Submitted)
    async def on_submit(self, event: PromptInput.Submitted) -> None:
        text = event.text.strip()
        if not text or self.current is None:
            return
        if text.startswith("/"):
            self.query_one("#prompt", PromptInput).clear()
            await self.run_command(text)
            return
        chat = self.chats[self.current]
        if chat.reply is not None:
            self.notify("still answering: Esc stops the reply", severity="warning")
            return
        self.query_one("#prompt", PromptInput).clear()
        user, answer = Item("user", text), Item("assistant")
        chat.items += [user, answer]
        await self._mount_item(user)
        await self._mount_item(answer)
        try:
            chat.reply = self.backend.chat(chat.name, text)
        except KvsideError as exc:
            self.notify(exc.message, severity="error")
            return
        self.query_one("#status", Static).update(f"{chat.name}: reading the prompt...")
        self.stream_reply(chat, answer)

    async def retry(self, chat: Chat) -> None:
        """Another answer to the last message: the last reply's cells go and only the generation
        prompt is read, so it starts at once however long the chat."""
        if not chat.items or chat.items[-1].role != "assistant":
            self.notify("no reply to give again yet", severity="warning")
            return
        try:
            chat.reply = self.backend.again(chat.name)
        except KvsideError as exc:
            self.notify(exc.message, severity="error")
            return
        old = chat.items.pop()
        if old.widget is not None and old.widget.is_mounted:
            await old.widget.remove()
        answer = Item("assistant")
        chat.items.append(answer)
        await self._mount_item(answer)
        self.query_one("#status", Static).update(f"{chat.name}: answering again...")
        self.stream_reply(chat, answer)

    @work(group="replies")
    async def stream_reply(self, chat: Chat, item: Item) -> None:
        try:
            await self._stream_reply(chat, item)
        except NoMatches:
            pass  # the app is closing; the transcript already holds the text

    async def _stream_reply(self, chat: Chat, item: Item) -> None:
        started = False
        async for kind, value in drain(chat.reply):
            if kind == "text":
                if not started and self.current == chat.name:
                    started = True
                    self.query_one("#status", Static).update(f"{chat.name}: answering... (Esc stops)")
                item.text += value
                if self.current == chat.name and item.widget is not None and item.widget.is_mounted:
                    if item.stream is None:
                        item.stream = Markdown.get_stream(item.widget)
                        await item.widget.update(item.text[: -len(value)])
                    await item.stream.write(value)
                    self.query_one("#log", VerticalScroll).scroll_end(animate=False)
            elif kind == "notice":
                text = value.get("message") or f"context full: rolled {value.get('dropped')} tokens"
                self.notify(text, title="tool results pruned" if value.get("kind") == "prune" else "auto-roll",
                            timeout=8)
            elif kind == "error":
                self.notify(str(value), title="error", severity="error")
            elif kind == "done":
                chat.last = value
                computed = value["prompt"] - value["cached"]
                chat.status = (f"{self.backend.model_name} | reused {value['cached']} computed {computed} "
                               f"| {value['tokens']} tokens {value['tok_s']:.0f} tok/s | {value['finish_reason']}")
        try:
            if item.stream is not None:
                await item.stream.stop()
                item.stream = None
            if self.current == chat.name and self.is_running and self.screen.is_mounted:
                self.query_one("#status", Static).update(chat.status)
                if item.widget is not None and item.widget.is_mounted:
                    await item.widget.update(item.text)
                await self.refresh_map()
        finally:
            chat.reply = None  # last: the session takes a new prompt only once its view is settled

    def action_stop(self) -> None:
        chat = self.chats.get(self.current or "")
        if chat and chat.reply is not None:
            chat.reply.cancel()  # the typed prompt stays where it is

    async def action_new_session(self) -> None:
        await self.new_chat(None)

    def action_copy_reply(self) -> None:
        chat = self.chats.get(self.current or "")
        replies = [i.text for i in (chat.items if chat else []) if i.role == "assistant" and i.text]
        if replies:
            self.copy_to_clipboard(replies[-1])
            self.notify("copied the last reply")

    # -- commands -------------------------------------------------------------------------------
    async def run_command(self, line: str) -> None:
        try:
            words = shlex.split(line)
        except ValueError as exc:
            self.notify(f"cannot parse command: {exc}", severity="error")
            return
        cmd, args = words[0].lstrip("/"), words[1:]
        name = self.current
        try:
            await self._command(cmd, args, name)
        except KvsideError as exc:
            self.notify(exc.message, title=f"/{cmd}", severity="error")
        except (ValueError, IndexError, KeyError):
            self.notify(f"usage: {HELP}", title=f"/{cmd}", severity="error", timeout=10)
        except Exception as exc:  # a failed command is a notification, never a crash
            self.notify(f"{type(exc).__name__}: {exc}", title=f"/{cmd}", severity="error")
        await self.refresh_map()

    async def _command(self, cmd: str, args: list[str], name: str | None) -> None:
        b = self.backend
        if cmd == "help":
            self.notify(HELP, title="commands", timeout=15)
        elif cmd == "new":
            await self.new_chat(args[0] if args else None)
        elif cmd in ("roll", "compact", "mask", "fork", "save", "strategy", "delete", "rename", "attach",
                     "prune-tools", "fidelity", "retry") and \
                self.chats[name].reply is not None:
            self.notify("wait for the reply to finish (Esc stops it)", severity="warning")
        elif cmd == "retry":
            await self.retry(self.chats[name])
        elif cmd == "roll":
            r = await b.edit(name, "roll", drop=int(args[0]), strategy=args[1] if len(args) > 1 else None)
            self.notify(f"dropped {r['dropped']} tokens with {r['strategy']} in {r['t_edit_s'] * 1000:.0f} ms"
                        + (f" ({r['fallback']})" if r.get("fallback") else ""), title="roll")
        elif cmd == "compact":
            snapshot = await b.cache_map(name)
            ids = [m["id"] for m in snapshot["messages"] if not m["pinned"]]
            up_to = int(args[0]) if args else (ids[-3] if len(ids) >= 3 else ids[-1])
            r = await b.edit(name, "compact", up_to=up_to)
            self.notify(f"summarized {len(r['messages'])} messages, masked {r.get('masked', 0)} tokens "
                        f"in {r['t_edit_s']:.1f} s", title="compact")
        elif cmd == "mask":
            close = "close" in args[1:]
            strategy = next((a for a in args[1:] if a != "close"), "shift")
            r = await b.edit(name, "mask", messages=[int(args[0])], close_gap=close, strategy=strategy)
            self.notify(f"masked {r['masked']} tokens of message {args[0]}", title="mask")
        elif cmd == "fork":
            r = await b.edit(name, "fork", name=args[0] if args else None)
            child = r["session"]
            await self._add_chat(Chat(child, [Item(i.role, i.text) for i in self.chats[name].items]))
            await self.switch_to(child)
            self.notify(f"forked {name} into {child}", title="fork")
        elif cmd == "save":
            r = await b.edit(name, "save", path=args[0] if args else None)
            where = r.get("path") or r.get("file")
            self.notify(f"saved {r['bytes'] / 1e6:.1f} MB to {where} in {r['t_save_s'] * 1000:.0f} ms", title="save")
        elif cmd == "restore":
            restored = await b.restore(args[0], args[1] if len(args) > 1 else None)
            if restored in self.chats:
                self.chats[restored].loaded = False
            else:
                await self._add_chat(Chat(restored, loaded=False))
            await self.switch_to(restored)
            self.notify(f"restored {restored}", title="restore")
        elif cmd == "fidelity":
            r = await b.edit(name, "fidelity", tokens=int(args[0]) if args else 64)
            self.notify(f"{r['tokens']} tokens after {r['context_tokens']} cells ({r['position_gaps']} positions "
                        f"left empty by edits): KL {r['kl']:.2e}, top-1 {r['top1']:.0%} against a re-prefill "
                        f"(measured in {r['t_measure_s']:.1f} s)", title="fidelity", timeout=10)
        elif cmd == "strategy":
            await b.edit(name, "strategy", strategy=args[0])
            self.notify(f"roll strategy: {args[0]}", title="strategy")
        elif cmd == "prune-tools":
            keep = None if args and args[0] == "off" else int(args[0]) if args and args[0].isdigit() else -1
            if keep == -1:
                self.notify("usage: /prune-tools N|off", severity="warning")
            else:
                await b.edit(name, "policy", prune_tools=keep)
                self.notify("tool results roll with their turns" if keep is None else
                            f"a full window masks old tool results, keeping the last {keep}", title="policy")
        elif cmd == "delete":
            await b.delete_session(name)
            del self.chats[name]
            await self.query_one(f"#s-{_safe(name)}").remove()
            if self.chats:
                await self.switch_to(next(iter(self.chats)))
            else:
                await self.new_chat(None)
        elif cmd == "rename":
            new = args[0]
            await self.backend.rename(name, new)
            chat = self.chats.pop(name)
            chat.name = new
            await self.query_one(f"#s-{_safe(name)}").remove()
            await self._add_chat(chat)
            await self.switch_to(new)
        elif cmd == "attach":
            how = args[1] if len(args) > 1 else "0"
            if how.lstrip("-").isdigit():
                r = await b.edit(name, "attach", document=args[0], recompute=int(how))
            else:
                r = await b.edit(name, "attach", document=args[0], strategy=how)
            self.chats[name].items.append(Item("user", f"*attached {args[0]}: {r['tokens']} tokens, no prefill*"))
            await self._mount_item(self.chats[name].items[-1])
            self.notify(f"attached {r['tokens']} tokens in {r['t_attach_s'] * 1000:.0f} ms "
                        f"({r['blocks']} block(s), {r['recomputed']} recomputed)", title="attach")
        else:
            self.notify(f"unknown command /{cmd}; /help lists them", severity="error")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def run(engine_factory, system: str | None = None, session: str | None = None) -> int:
    ChatApp(engine_factory, system=system, session=session).run()
    return 0
