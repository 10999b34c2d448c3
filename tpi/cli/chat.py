"""`tpi chat`: the terminal chat, on a local engine or group, or on a running server's API."""
from __future__ import annotations

import contextlib
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from tpi.cli.options import Backend, Context, ModelArg, Threads, Speculate, Draft, reports_errors, say
from tpi.errors import TpiError

LocalWorkersOpt = Annotated[int, typer.Option("--local-workers", help="also start N worker processes on this machine (loopback group)", envvar="TPI_LOCAL_WORKERS")]
ApiKeyOpt = Annotated[Optional[str], typer.Option("--api-key", help="Bearer key: required by the API (serve) or sent to it (chat --url)", envvar="TPI_API_KEY")]
ConfigDirOpt = Annotated[Optional[Path], typer.Option("--config-dir", help="where keys and the join secret live (group mode)", envvar="TPI_CONFIG_DIR")]
CacheDirOpt = Annotated[Optional[Path], typer.Option("--cache-dir", help="where shards are cached (group mode)", envvar="TPI_CACHE_DIR")]


@contextlib.contextmanager
def sigint_ignored_by_children(active: bool, say):
    """Local workers share the terminal's process group, so the Ctrl-C that stops an answer would
    also kill them. An ignored SIGINT is inherited across exec, so workers spawned meanwhile keep
    running; the price is that Ctrl-C cannot abort the group's start."""
    if not active:
        yield
        return
    say("starting local workers (Ctrl-C is ignored until the group is ready)")
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def start_master(model, local_workers: int, context, threads, backend: str, config_dir: Path | None = None,
                 cache_dir: Path | None = None, speculate: str = "auto", draft: str | None = None):
    """Rank 0's group on this machine (with local workers, a loopback group)."""
    # imported when the command runs: keeps `tpi --help` fast
    from tpi.master import GroupOptions, start_group

    dirs = {k: v for k, v in (("config_dir", config_dir), ("cache_dir", cache_dir)) if v is not None}
    opts = GroupOptions(model=model, local_workers=local_workers, host="127.0.0.1", context=context,
                        threads=threads, backend=backend, speculate=speculate, draft=draft, **dirs)
    with sigint_ignored_by_children(local_workers > 0, say):
        return start_group(opts, on_event=say)


@reports_errors
def chat(
    model: ModelArg = None,
    local_workers: LocalWorkersOpt = 0,
    url: Annotated[Optional[str], typer.Option("--url", help="talk to a running OpenAI-compatible server, e.g. http://127.0.0.1:8000", envvar="TPI_URL")] = None,
    api_key: ApiKeyOpt = None,
    system: Annotated[Optional[str], typer.Option("--system", help="system prompt")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="tokens per answer at most")] = 512,
    temperature: Annotated[float, typer.Option("--temperature", help="0 = greedy")] = 0.7,
    top_p: Annotated[Optional[float], typer.Option("--top-p", help="nucleus sampling threshold")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="sampling seed (same seed, same answer)")] = None,
    plain: Annotated[bool, typer.Option("--plain", help="plain text lines even on a terminal")] = False,
    threads: Threads = None,
    context: Context = None,
    backend: Backend = "auto",
    speculate: Speculate = "auto",
    draft: Draft = None,
    config_dir: ConfigDirOpt = None,
    cache_dir: CacheDirOpt = None,
) -> None:
    """Chat with the model: a TUI on a terminal, one prompt per line through a pipe."""
    # imported when the command runs: keeps `tpi --help` fast
    from tpi.serve.chat_backends import ChatOptions, LocalChat, RemoteChat
    from tpi.serve.tui import ChatSession, run_plain, run_tui

    opts = ChatOptions(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    group, service, code = None, None, 0
    try:
        if max_tokens < 1:
            raise TpiError(f"--max-tokens {max_tokens} must be at least 1")
        if url:
            chat_backend = RemoteChat(url, api_key=api_key)
        else:
            from tpi.serve.service import GenerationService  # local mode only

            group = start_master(model, local_workers, context, threads, backend, config_dir, cache_dir, speculate,
                                 draft)
            service = GenerationService(group.engine, status=group.status)
            chat_backend = LocalChat(service)
        session = ChatSession(chat_backend, opts, system=system)
        interactive = not plain and sys.stdin.isatty() and sys.stdout.isatty()
        code = run_tui(session) if interactive else run_plain(session)
    except KeyboardInterrupt:
        code = 130
    finally:
        if service is not None:
            service.close()
        if group is not None:
            group.close()
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.command()(chat)
