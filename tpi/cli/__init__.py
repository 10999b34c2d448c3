"""The `tpi` command: thin typer commands that hand off to plain functions.

This is the only module that reads environment variables (through typer's envvar=), and the
only place a TpiError becomes an exit code.
"""
from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from tpi.errors import TpiError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Tensor-parallel LLM inference across home devices.")

ModelArg = Annotated[Optional[str], typer.Argument(help="GGUF file or Hugging Face folder (default: embedded SmolLM2-135M)", envvar="TPI_MODEL")]
Threads = Annotated[Optional[int], typer.Option("--threads", "-t", help="compute threads (default: all cores)", envvar="TPI_THREADS")]
Context = Annotated[Optional[int], typer.Option("--context", "-c", help="context length to plan for (default: min(model, 4096))")]
Backend = Annotated[str, typer.Option("--backend", help="kernel backend: auto (the best this device can load: ggml, else numpy), ggml, numpy, or torch (only when named)")]
Budget = Annotated[Optional[str], typer.Option("--memory-budget", help="memory budget for weights+cache, e.g. 600MB; the rest streams from disk", envvar="TPI_MEMORY_BUDGET")]
LocalWorkers = Annotated[int, typer.Option("--local-workers", help="also start N worker processes on this machine (loopback group)")]
ConfigDir = Annotated[Path, typer.Option("--config-dir", help="where keys and the join secret live", envvar="TPI_CONFIG_DIR")]
CacheDir = Annotated[Path, typer.Option("--cache-dir", help="where shards are cached", envvar="TPI_CACHE_DIR")]
Insecure = Annotated[bool, typer.Option("--insecure", help="no encryption or authentication (benchmarks only)")]
WireDtype = Annotated[Optional[str], typer.Option("--wire-dtype", help="partial sums on the wire: f32 (exact), bf16, or int8 (lossy blocks of 32, a quarter of f32's bytes; only on request) (default: the planner's choice of f32 or bf16)")]
DEFAULT_CONFIG_DIR = Path.home() / ".config" / "tpi"
# Optional modules -> the pip extra that installs them (pyproject.toml); the base install is the worker's.
MODULE_EXTRAS = {"torch": "all", "fastapi": "all", "uvicorn": "all", "jinja2": "all",
                 "tokenizers": "all", "safetensors": "all", "httpx": "all", "llama_cpp": "all"}
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "tpi"


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


def _setup_logging(verbose: bool) -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=Console(stderr=True), show_path=False, show_time=False)],
    )


def fail(e: TpiError) -> None:
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(e.exit_code)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False) -> None:
    _setup_logging(verbose)


def peak_rss_bytes() -> int:
    """VmHWM of this process."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@app.command()
def run(
    model: ModelArg = None,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="the user message (or raw text with --raw)")] = "Hello!",
    system: Annotated[Optional[str], typer.Option("--system", help="system prompt")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="send the prompt as is, without the chat template")] = False,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="tokens to generate at most")] = 256,
    temperature: Annotated[float, typer.Option("--temperature", help="0 = greedy")] = 0.8,
    top_k: Annotated[int, typer.Option("--top-k")] = 40,
    top_p: Annotated[float, typer.Option("--top-p")] = 0.95,
    min_p: Annotated[float, typer.Option("--min-p")] = 0.05,
    repeat_penalty: Annotated[float, typer.Option("--repeat-penalty")] = 1.0,
    seed: Annotated[Optional[int], typer.Option("--seed")] = None,
    stop: Annotated[Optional[list[str]], typer.Option("--stop", help="stop string (repeatable)")] = None,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="keep generating past end-of-sequence")] = False,
    threads: Threads = None,
    context: Context = None,
    backend: Backend = "auto",
    memory_budget: Budget = None,
    local_workers: LocalWorkers = 0,
    wire_dtype: WireDtype = None,
    config_dir: ConfigDir = DEFAULT_CONFIG_DIR,
    cache_dir: CacheDir = DEFAULT_CACHE_DIR,
    insecure: Insecure = False,
    stats: Annotated[bool, typer.Option("--stats", help="print timing stats to stderr")] = False,
    stats_json: Annotated[Optional[Path], typer.Option("--stats-json", help="write stats as JSON to this file")] = None,
) -> None:
    """Run one chat turn (or raw completion), streaming the answer to stdout."""
    from tpi.master.group import GroupOptions, start_group
    from tpi.master.sampler import SamplingParams

    group = None
    try:
        group = start_group(GroupOptions(
            model=model, local_workers=local_workers, host="127.0.0.1", context=context, threads=threads,
            backend=backend, memory_budget=parse_size(memory_budget), wire_dtype=wire_dtype, insecure=insecure,
            config_dir=config_dir, cache_dir=cache_dir), say=lambda m: typer.echo(m, err=True))
        engine = group.engine
        tok = engine.tokenizer
        if raw:
            ids = tok.encode(prompt, add_bos=True, special=True)
        else:
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            ids = tok.apply_chat_template(messages)
        params = SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, seed=seed)

        def write(piece: str) -> None:
            sys.stdout.write(piece)
            sys.stdout.flush()

        gen = engine.generate(ids, params, max_tokens, stop=stop or (), ignore_eos=ignore_eos, on_text=write)
        sys.stdout.write("\n")
        sys.stdout.flush()
        report = gen.stats() | {"peak_rss_bytes": peak_rss_bytes()} | engine_stats(engine)
    except TpiError as e:
        fail(e)
    finally:
        if group is not None:
            group.close()
    if stats:
        print_stats(report)
    if stats_json:
        stats_json.write_text(json.dumps(report, indent=2))


def engine_stats(engine) -> dict:
    """Rank 0's time split, traffic and streaming figures since the engine started."""
    st = engine.model.stats
    out = {"compute_s": st.compute_s, "allreduce_s": st.allreduce_s, "forward_passes": st.passes,
           "world": engine.comm.world}
    comm_stats = getattr(engine.comm, "stats", None)
    if comm_stats is not None:
        out |= {"bytes_sent": comm_stats.bytes_sent, "bytes_received": comm_stats.bytes_received}
    plan = getattr(engine.model.weights, "plan", None)
    if plan is not None:
        out |= {"pinned_blocks": len(plan.pinned), "streamed_blocks": len(plan.streamed), "window": plan.window}
        out |= engine.model.weights.token_stats()
    return out


def print_stats(report: dict) -> None:
    from rich.table import Table

    from tpi.cli.table_text import print_tables

    table = Table(title="tpi stats", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in report.items():
        table.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    print_tables(table, stderr=True)


@app.command()
def perplexity(
    model: ModelArg = None,
    file: Annotated[Path, typer.Option("--file", "-f", help="text file to score")] = ...,
    tokens: Annotated[int, typer.Option("--tokens", help="score the first N tokens (one window)")] = 512,
    threads: Threads = None,
    backend: Backend = "auto",
) -> None:
    """Perplexity over one window of a text file (llama.cpp's method); the last number printed is it."""
    from tpi.master.engine import EngineOptions, build_local_engine

    try:
        if not file.is_file():
            raise TpiError(f"text file not found: {file}")
        engine = build_local_engine(EngineOptions(model, max(tokens, 8), threads, backend))
        ids = engine.tokenizer.encode(file.read_text(errors="replace"), add_bos=True, special=False)[:tokens]
        ppl = window_perplexity(engine, ids)
    except TpiError as e:
        fail(e)
    typer.echo(f"tokens scored: {len(ids) - 1}", err=True)
    typer.echo(f"perplexity: {ppl:.4f}")


def window_perplexity(engine, ids: list[int]) -> float:
    """exp(mean negative log-likelihood) of every token after the first."""
    import numpy as np

    from tpi.model.config import PREFILL_CHUNK

    if len(ids) < 2:
        raise TpiError("the text has fewer than 2 tokens; give a longer file")
    engine.reset()
    nll = []
    for i in range(0, len(ids) - 1, PREFILL_CHUNK):
        chunk = ids[i : min(i + PREFILL_CHUNK, len(ids) - 1)]
        logits = engine.forward(chunk, i, all_positions=True).astype(np.float64)  # (T, vocab)
        logz = logits.max(-1) + np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))
        targets = np.asarray(ids[i + 1 : i + 1 + len(chunk)])
        nll.append(logz - logits[np.arange(len(chunk)), targets])
    return float(math.exp(np.concatenate(nll).mean()))


@app.command()
def convert(
    model: ModelArg = None,
    out: Annotated[Optional[Path], typer.Argument(help="output file, e.g. model.tpis (a lone argument is OUT)")] = None,
    quant: Annotated[Optional[str], typer.Option("--quant", help="quantize HF weights to a GGML type: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, F16, BF16 (q8, q4g32 still accepted); GGUF keeps its own types")] = None,
    keep_bf16_above: Annotated[Optional[float], typer.Option("--keep-bf16-above", help="with --quant: keep bf16 where the relative RMS error exceeds this")] = None,
) -> None:
    """Write a model as tpi's native file (GGUF types kept), with a per-tensor conversion report."""
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from tpi.formats import open_model
    from tpi.master.convert import convert as convert_model

    console = Console(stderr=True)
    if out is None:  # `tpi convert OUT` converts the embedded default model
        model, out = None, Path(model or "model.tpis")
    try:
        source = open_model(model, quant=quant, measure_error=True, keep_bf16_above=keep_bf16_above)
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task("converting", total=None)
            notes = convert_model(source, out, lambda key, i, n: bar.update(task, completed=i, total=n, description=key))
    except TpiError as e:
        fail(e)
    table = Table(title=f"{out}: per-tensor conversion")
    for col in ("tensor", "from", "to", "exact", "rel rmse", "max abs"):
        table.add_column(col)
    for name, note in notes.items():
        err = note.error
        table.add_row(name, note.source_type, note.target_fmt, "yes" if note.exact else "no",
                      f"{err.rel_rmse:.2e}" if err else "-", f"{err.max_abs:.2e}" if err else "-")
    console.print(table)
    typer.echo(str(out))


def _register_subcommands() -> None:
    """Commands that live in their own modules (chat, group, devices) register themselves."""
    from tpi.cli import chat, devices, group

    for module in (chat, group, devices):
        module.register(app)


_register_subcommands()


def entry(prog_name: str | None = None) -> None:
    """The `tpi` command: a missing optional module is one error line naming the extra, never a traceback."""
    try:
        app(prog_name=prog_name)
    except ModuleNotFoundError as e:
        top = (e.name or "").partition(".")[0]
        if top not in MODULE_EXTRAS:
            raise
        typer.echo(f"error: this command needs the '{top}' package, which is not installed here; "
                   f"install it with: pip install 'tpi[{MODULE_EXTRAS[top]}]'", err=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    entry()
