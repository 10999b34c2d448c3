"""`tpi chat`: a rich chat TUI on a terminal, plain text lines through a pipe.

Both modes share `ChatSession` (history, commands, save); a backend from tpi.serve.chat_backends runs
the answers. Ctrl-C during an answer cancels that answer only; the history stays as before it.
"""
from __future__ import annotations

import contextlib
import io
import json
import queue
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tpi.serve.chat_backends import ChatOptions, TurnResult
from tpi.errors import TpiError

HELP = "/reset  /system TEXT  /stats  /devices  /save FILE  /quit"
CANCEL_GRACE_S = 5.0  # how long a cancelled answer may take to wind down before the prompt returns


@dataclass
class ChatSession:
    """The conversation: system prompt, finished turns, and the last answer's numbers."""

    backend: object
    opts: ChatOptions
    system: str | None = None
    turns: list[dict] = field(default_factory=list)  # user/assistant messages, in order
    last: TurnResult | None = None

    def messages(self, user_text: str | None = None) -> list[dict]:
        sys_msg = [{"role": "system", "content": self.system}] if self.system else []
        extra = [{"role": "user", "content": user_text}] if user_text is not None else []
        return sys_msg + self.turns + extra

    def start(self, user_text: str):
        return self.backend.start(self.messages(user_text), self.opts)

    def finish(self, user_text: str, result: TurnResult) -> None:
        """Keep a completed answer in the history; a cancelled one leaves the history unchanged."""
        self.last = result
        if result.finish_reason != "cancelled":
            self.turns += [{"role": "user", "content": user_text}, {"role": "assistant", "content": result.text}]

    def save(self, path: Path) -> str:
        msgs = self.messages()
        if path.suffix.lower() in (".md", ".markdown"):
            text = "\n\n".join(f"**{m['role']}**\n\n{m['content']}" for m in msgs) + "\n"
        else:
            text = json.dumps({"model": self.backend.model_name, "messages": msgs}, indent=2, ensure_ascii=False) + "\n"
        try:
            path.write_text(text, encoding="utf-8")
        except OSError as e:
            raise TpiError(f"cannot save to {path}: {e.strerror}; choose a writable path") from None
        return f"saved {len(msgs)} messages to {path}"


@dataclass(frozen=True)
class CommandOutput:
    """What a slash command shows: a message, or a titled table of rows."""

    message: str = ""
    title: str = ""
    rows: tuple[tuple[str, str], ...] = ()
    quit: bool = False


def run_command(session: ChatSession, line: str) -> CommandOutput:
    name, _, arg = line.strip().partition(" ")
    arg = arg.strip()
    if name in ("/quit", "/exit", "/q"):
        return CommandOutput(quit=True)
    if name == "/reset":
        session.turns.clear()
        session.last = None
        return CommandOutput("conversation cleared")
    if name == "/system":
        session.system = arg or None
        session.turns.clear()
        return CommandOutput(f"system prompt set to: {arg}; conversation cleared" if arg else "system prompt removed; conversation cleared")
    if name == "/stats":
        rows = []
        if session.last:
            r = session.last
            rows += [("ttft_s", f"{r.ttft_s:.3f}"), ("decode_tok_s", f"{r.decode_tok_s:.1f}"),
                     ("prompt_tokens", str(r.prompt_tokens)), ("completion_tokens", str(r.completion_tokens)),
                     ("finish_reason", r.finish_reason)]
        rows += [(k, _fmt(v)) for k, v in session.backend.stats().items() if k != "last"]
        rows.append(("history_messages", str(len(session.turns))))
        return CommandOutput(title="stats", rows=tuple(rows))
    if name == "/devices":
        devs = session.backend.devices()
        rows = tuple((str(d.get("rank", i)), describe_device(d)) for i, d in enumerate(devs))
        return CommandOutput(title=f"{len(devs)} device(s)", rows=rows)
    if name == "/save":
        if not arg:
            return CommandOutput("usage: /save FILE (.json or .md)")
        return CommandOutput(session.save(Path(arg).expanduser()))
    if name in ("/help", "/?"):
        return CommandOutput(HELP)
    return CommandOutput(f"unknown command {name}; commands: {HELP}")


def describe_device(d: dict) -> str:
    parts = [str(d.get("name", "?"))]
    if d.get("address") and d.get("address") != d.get("name"):
        parts.append(f"({d['address']})")
    if d.get("state"):
        parts.append(str(d["state"]))
    heads = (d.get("share") or {}).get("q_heads")  # [start, stop), as devices.slicing.shard_to_dict writes it
    if heads:
        parts.append(f"{heads[1] - heads[0]} heads")
    return " ".join(parts)


def status_line(result: TurnResult, devices: list[dict]) -> str:
    names = ", ".join(str(d.get("name", "?")) for d in devices) or "?"
    tail = " · stopped" if result.finish_reason == "cancelled" else ""
    return (f"TTFT {result.ttft_s:.2f} s · {result.decode_tok_s:.1f} tok/s · {result.completion_tokens} tokens"
            f" · {len(devices)} device(s): {names}{tail}")


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def wait_turn(turn, on_text, cancelled: bool = False, timeout: float | None = None) -> TurnResult | None:
    """Drain a turn's events; returns its result (None if it did not finish within timeout)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        left = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
        if left <= 0:
            return None
        try:
            ev = turn.events.get(timeout=left)
        except queue.Empty:
            continue
        if ev.kind == "text":
            on_text(ev.text)
        elif ev.kind == "error":
            raise ev.error
        else:
            return ev.generation


# -- plain mode (no TTY) ----------------------------------------------------------------------

def run_plain(session: ChatSession, stdin=None, stdout=None) -> int:
    """Read one prompt per line, print each answer as plain text (no ANSI codes)."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout

    def write(s: str) -> None:
        stdout.write(s)
        stdout.flush()

    for raw in stdin:
        line = raw.strip()
        if not line:
            continue
        if line.startswith("/"):
            try:
                out = run_command(session, line)
            except TpiError as e:
                sys.stderr.write(f"error: {e}\n")
                continue
            if out.quit:
                break
            if out.message:
                write(out.message + "\n")
            if out.title:
                write(f"{out.title}\n" + "".join(f"  {k}: {v}\n" for k, v in out.rows))
            continue
        turn = None
        try:
            turn = session.start(line)
            result = wait_turn(turn, write)
        except TpiError as e:
            sys.stderr.write(f"error: {e}\n")
            continue
        except KeyboardInterrupt:
            if turn is not None:
                turn.cancel()
            write("\n")
            return 130
        session.finish(line, result)
        write("\n")
    return 0


# -- rich TUI ---------------------------------------------------------------------------------

def run_tui(session: ChatSession, console=None) -> int:
    """The interactive chat: markdown streaming, slash commands, status line, Ctrl-C handling."""
    from rich.console import Console  # rich only for the terminal UI, not piped mode

    return _tui_loop(session, console or Console())


@contextlib.contextmanager
def streaming_terminal(stream):
    """While an answer streams: no echo (an echoed ^C or keystroke shifts the live region, so the
    answer's first lines show twice) and NOFLSH (Ctrl-C must not discard queued output)."""
    try:
        import termios  # POSIX terminals only

        fd = stream.fileno()
        saved = termios.tcgetattr(fd)
    except (ImportError, OSError, ValueError, io.UnsupportedOperation):
        yield
        return
    changed = list(saved)
    changed[3] = (changed[3] & ~(termios.ECHO | termios.ECHOCTL)) | termios.NOFLSH  # lflag
    termios.tcsetattr(fd, termios.TCSADRAIN, changed)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _tui_loop(session: ChatSession, console) -> int:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    devices = session.backend.devices()
    console.print(f"[bold]tpi chat[/] · {session.backend.model_name} · {len(devices)} device(s)")
    console.print(f"[dim]{HELP} · Ctrl-C stops an answer, Ctrl-C twice at the prompt quits[/]")
    armed = False  # a Ctrl-C just happened: the next one at the prompt quits
    while True:
        try:
            line = console.input("[bold cyan]you ›[/] ").strip()
        except KeyboardInterrupt:
            if armed:
                console.print()
                return 0
            armed = True
            console.print("\n[dim](Ctrl-C again to quit, or /quit)[/]")
            continue
        except EOFError:
            console.print()
            return 0
        armed = False
        if not line:
            continue
        if line.startswith("/"):
            try:
                out = run_command(session, line)
            except TpiError as e:
                console.print(f"[red]error:[/] {e}")
                continue
            if out.quit:
                return 0
            _show_command(console, out)
            if line.startswith("/devices"):
                devices = session.backend.devices()
            continue
        result, armed = _answer(console, session, line)
        if result is not None:
            session.finish(line, result)
            console.print(f"[dim]{status_line(result, devices)}[/]")


def _show_command(console, out: CommandOutput) -> None:
    from rich.table import Table  # (terminal UI only)

    if out.message:
        console.print(f"[yellow]{out.message}[/]")
    if out.title:
        table = Table(title=out.title, show_header=False)
        table.add_column("key")
        table.add_column("value", justify="right")
        for k, v in out.rows:
            table.add_row(k, v)
        console.print(table)


def _answer(console, session: ChatSession, line: str) -> tuple[TurnResult | None, bool]:
    """Stream one answer as markdown; returns (result or None on error, whether Ctrl-C stopped it)."""
    from rich.live import Live  # (terminal UI only)
    from rich.markdown import Markdown

    text: list[str] = []
    try:
        turn = session.start(line)
    except TpiError as e:
        console.print(f"[red]error:[/] {e}")
        return None, False
    stopped = False
    with streaming_terminal(sys.stdin), \
            Live(Markdown(""), console=console, refresh_per_second=10, vertical_overflow="visible") as live:
        def on_text(piece: str) -> None:
            text.append(piece)
            live.update(Markdown("".join(text)))

        try:
            try:
                result = wait_turn(turn, on_text)
            except KeyboardInterrupt:
                stopped = True
                turn.cancel()
                try:
                    result = wait_turn(turn, on_text, timeout=CANCEL_GRACE_S)
                except KeyboardInterrupt:
                    result = None
                if result is None:  # the backend is still winding down: the answer counts as cancelled
                    result = TurnResult("".join(text), "cancelled", 0, len(text), 0.0, 0.0)
        except TpiError as e:
            live.update(Markdown("".join(text)))
            console.print(f"[red]error:[/] {e}")
            return None, stopped
    if stopped:
        result = TurnResult(result.text, "cancelled", result.prompt_tokens, result.completion_tokens,
                            result.ttft_s, result.decode_tok_s)
        console.print("[yellow](answer stopped; it is not kept in the history)[/]")
    return result, stopped
