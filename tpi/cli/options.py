"""What the `tpi` commands share: their common options, sizes, events on stderr, and the one error wrapper.

Commands import what they run inside their bodies, so `tpi join` on a phone never imports the API,
torch or the tokenizer (start-up time).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from tpi.errors import TpiError

ModelArg = Annotated[Optional[str], typer.Argument(help="GGUF file or Hugging Face folder (default: embedded SmolLM2-135M)", envvar="TPI_MODEL")]
Threads = Annotated[Optional[int], typer.Option("--threads", "-t", help="compute threads (default: all cores)", envvar="TPI_THREADS")]
Context = Annotated[Optional[int], typer.Option("--context", "-c", help="context length to plan for (default: min(model, 4096))")]
Backend = Annotated[str, typer.Option("--backend", help="kernel backend: auto (the best this device can load: ggml, else numpy), ggml, numpy, or torch (only when named)")]
Budget = Annotated[Optional[str], typer.Option("--memory-budget", help="memory budget for weights+cache, e.g. 600MB; the rest streams from disk", envvar="TPI_MEMORY_BUDGET")]
LocalWorkers = Annotated[int, typer.Option("--local-workers", help="also start N worker processes on this machine (loopback group)")]
ConfigDir = Annotated[Path, typer.Option("--config-dir", help="where keys and the join secret live", envvar="TPI_CONFIG_DIR")]
CacheDir = Annotated[Path, typer.Option("--cache-dir", help="where shards are cached", envvar="TPI_CACHE_DIR")]
Insecure = Annotated[bool, typer.Option("--insecure", help="no encryption or authentication (benchmarks only)")]
Speculate = Annotated[str, typer.Option("--speculate", help="speculative decoding: auto (draft by prompt lookup or --draft, k adapts to the measured acceptance, off where it does not pay), lookup (prompt lookup, always 8 drafts), off")]
Draft = Annotated[Optional[str], typer.Option("--draft", help="a small model with the same vocabulary (GGUF) that drafts tokens on the master; default: prompt lookup")]
WireDtype = Annotated[Optional[str], typer.Option("--wire-dtype", help="partial sums on the wire: f32 (exact), bf16, or int8 (lossy blocks of 32, a quarter of f32's bytes; only on request) (default: the planner's choice of f32 or bf16)")]
Experts = Annotated[Optional[str], typer.Option("--experts", help="MoE models: split (every expert's columns across the devices: balanced per token) or whole (whole experts per device: less to read when they stream) (default: the cost model's choice)")]
DEFAULT_CONFIG_DIR = Path.home() / ".config" / "tpi"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "tpi"
# Optional modules -> the pip extra that installs them (pyproject.toml); the base install is the worker's.
MODULE_EXTRAS = {"torch": "all", "fastapi": "all", "uvicorn": "all", "jinja2": "all",
                 "tokenizers": "all", "safetensors": "all", "httpx": "all", "llama_cpp": "all"}


def parse_size(text: str | None) -> int | None:
    """'600MB', '2GiB', '1.5G', '123456' -> bytes."""
    if text is None:
        return None
    units = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 1024, "m": 1e6, "mb": 1e6, "mib": 1 << 20,
             "g": 1e9, "gb": 1e9, "gib": 1 << 30, "t": 1e12, "tb": 1e12, "tib": 1 << 40}
    t = text.strip().lower().replace(" ", "")
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    try:
        value = float(num) * units[t[len(num):]]
    except (ValueError, KeyError):
        raise TpiError(f"cannot read size '{text}'; write it like 600MB or 2GiB") from None
    if value <= 0:
        raise TpiError(f"size '{text}' must be positive")
    return int(value)


def fail(e: TpiError) -> None:
    """One `error:` line on stderr and the error's exit code."""
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(e.exit_code)


def reports_errors(command: Callable) -> Callable:
    """A command whose TpiError (the problem and its fix) ends it as one `error:` line: the one wrapper."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except TpiError as e:
            fail(e)

    return run


def say(event) -> None:
    """Show a master event (tpi.master.events) or message on stderr: progress never mixes with answers."""
    typer.echo(str(event), err=True)
