"""One-shot commands: `tpi run` (a chat turn or raw completion), `tpi perplexity`, `tpi convert`."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from tpi.cli.options import (DEFAULT_CACHE_DIR, DEFAULT_CONFIG_DIR, Backend, Budget, CacheDir, ConfigDir, Context, Experts,
                             Insecure, LocalWorkers, ModelArg, Threads, WireDtype, Speculate, Draft, parse_size, reports_errors, say)
from tpi.errors import TpiError


@reports_errors
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
    speculate: Speculate = "auto",
    draft: Draft = None,
    experts: Experts = None,
    config_dir: ConfigDir = DEFAULT_CONFIG_DIR,
    cache_dir: CacheDir = DEFAULT_CACHE_DIR,
    insecure: Insecure = False,
    stats: Annotated[bool, typer.Option("--stats", help="print timing stats to stderr")] = False,
    stats_json: Annotated[Optional[Path], typer.Option("--stats-json", help="write stats as JSON to this file")] = None,
) -> None:
    """Run one chat turn (or raw completion), streaming the answer to stdout."""
    # imported when the command runs: keeps `tpi --help` fast
    from tpi.master import GroupOptions, start_group
    from tpi.master.sampler import SamplingParams
    from tpi.scheduler.overhead import peak_rss_bytes

    group = start_group(GroupOptions(
        model=model, local_workers=local_workers, host="127.0.0.1", context=context, threads=threads,
        backend=backend, memory_budget=parse_size(memory_budget), wire_dtype=wire_dtype, experts=experts, insecure=insecure,
        config_dir=config_dir, cache_dir=cache_dir, speculate=speculate, draft=draft), on_event=say)
    try:
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
    finally:
        group.close()
    if stats:
        print_stats(report)
    if stats_json:
        stats_json.write_text(json.dumps(report, indent=2))


def engine_stats(engine) -> dict:
    """Rank 0's time split, traffic and streaming figures since the engine started."""
    st, comm = engine.model.stats, engine.comm
    out = {"compute_s": st.compute_s, "allreduce_s": st.allreduce_s, "forward_passes": st.passes,
           "world": comm.world, "bytes_sent": comm.stats.bytes_sent, "bytes_received": comm.stats.bytes_received}
    plan = getattr(engine.model.weights, "plan", None)  # StreamedWeights has a window plan, resident weights none
    if plan is not None:
        out |= {"pinned_blocks": len(plan.pinned), "streamed_blocks": len(plan.streamed), "window": plan.window}
        out |= engine.model.weights.token_stats()
    cache = getattr(engine.model.layers, "expert_cache", None)  # MoE experts streamed (tpi.scheduler.experts)
    if cache is not None:
        e = cache.stats()
        out |= {"expert_uses": e.uses, "expert_hits": e.hits, "expert_hit_rate": e.hit_rate,
                "expert_bytes_read": e.bytes_read, "hot_experts_per_block": cache.hot}
    return out


def print_stats(report: dict) -> None:
    # imported when the command runs: keeps `tpi --help` fast
    from rich.table import Table

    from tpi.cli.table_text import print_tables

    table = Table(title="tpi stats", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in report.items():
        table.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    print_tables(table, stderr=True)


@reports_errors
def perplexity(
    model: ModelArg = None,
    file: Annotated[Path, typer.Option("--file", "-f", help="text file to score")] = ...,
    tokens: Annotated[int, typer.Option("--tokens", help="score the first N tokens (one window)")] = 512,
    threads: Threads = None,
    backend: Backend = "auto",
) -> None:
    """Perplexity over one window of a text file (llama.cpp's method); the last number printed is it."""
    # imported when the command runs: keeps `tpi --help` fast
    from tpi.master import EngineOptions, build_local_engine
    from tpi.master.perplexity import window_perplexity

    if not file.is_file():
        raise TpiError(f"text file not found: {file}")
    engine = build_local_engine(EngineOptions(model, max(tokens, 8), threads, backend))
    ids = engine.tokenizer.encode(file.read_text(errors="replace"), add_bos=True, special=False)[:tokens]
    ppl = window_perplexity(engine, ids)
    typer.echo(f"tokens scored: {len(ids) - 1}", err=True)
    typer.echo(f"perplexity: {ppl:.4f}")


@reports_errors
def convert(
    model: ModelArg = None,
    out: Annotated[Optional[Path], typer.Argument(help="output file, e.g. model.tpis (a lone argument is OUT)")] = None,
    quant: Annotated[Optional[str], typer.Option("--quant", help="quantize HF weights to a GGML type: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, F16, BF16 (q8, q4g32 still accepted); GGUF keeps its own types")] = None,
    keep_bf16_above: Annotated[Optional[float], typer.Option("--keep-bf16-above", help="with --quant: keep bf16 where the relative RMS error exceeds this")] = None,
) -> None:
    """Write a model as tpi's native file (GGUF types kept), with a per-tensor conversion report."""
    # imported when the command runs: keeps `tpi --help` fast
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from tpi.formats import open_model
    from tpi.master.convert import convert as convert_model

    console = Console(stderr=True)
    if out is None:  # `tpi convert OUT` converts the embedded default model
        model, out = None, Path(model or "model.tpis")
    source = open_model(model, quant=quant, measure_error=True, keep_bf16_above=keep_bf16_above)
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("converting", total=None)
        notes = convert_model(source, out, lambda key, i, n: bar.update(task, completed=i, total=n, description=key))
    table = Table(title=f"{out}: per-tensor conversion")
    for col in ("tensor", "from", "to", "exact", "rel rmse", "max abs"):
        table.add_column(col)
    for name, note in notes.items():
        err = note.error
        table.add_row(name, note.source_type, note.target_fmt, "yes" if note.exact else "no",
                      f"{err.rel_rmse:.2e}" if err else "-", f"{err.max_abs:.2e}" if err else "-")
    console.print(table)
    typer.echo(str(out))


def register(app: typer.Typer) -> None:
    for command in (run, perplexity, convert):
        app.command()(command)
