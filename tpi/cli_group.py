"""Group commands: `tpi serve` (master), `tpi join` (worker), `tpi token`."""
from __future__ import annotations

import platform
import signal
import threading
from pathlib import Path
from typing import Annotated, Optional

import typer

from tpi.cli import (DEFAULT_CACHE_DIR, DEFAULT_CONFIG_DIR, Backend, Budget, CacheDir, ConfigDir, Context, Insecure,
                     LocalWorkers, ModelArg, Threads, fail, parse_size)
from tpi.errors import TpiError

token_app = typer.Typer(help="Manage the join token.", no_args_is_help=True)


def serve(
    model: ModelArg = None,
    devices: Annotated[int, typer.Option("--devices", "-d", help="total group size to wait for, this master included")] = 1,
    local_workers: LocalWorkers = 0,
    host: Annotated[str, typer.Option("--host", help="address to listen on for devices")] = "0.0.0.0",
    port: Annotated[int, typer.Option("--port", "-p", help="control port for devices (data uses port+1)")] = 7610,
    api_host: Annotated[str, typer.Option("--api-host", help="address of the OpenAI-compatible API")] = "127.0.0.1",
    api_port: Annotated[int, typer.Option("--api-port", help="port of the OpenAI-compatible API")] = 8000,
    api_key: Annotated[Optional[str], typer.Option("--api-key", help="require this Bearer key on the API", envvar="TPI_API_KEY")] = None,
    wire_dtype: Annotated[str, typer.Option("--wire-dtype", help="allreduce wire dtype: f32 or bf16")] = "f32",
    ratios: Annotated[Optional[str], typer.Option("--ratios", help="split ratios by rank, e.g. 2,1")] = None,
    threads: Threads = None,
    context: Context = None,
    backend: Backend = "torch",
    memory_budget: Budget = None,
    config_dir: ConfigDir = DEFAULT_CONFIG_DIR,
    cache_dir: CacheDir = DEFAULT_CACHE_DIR,
    insecure: Insecure = False,
) -> None:
    """Be the master: wait for devices, ship their shards, then serve the API."""
    from tpi.group import GroupOptions, start_group

    group = None
    try:
        parsed = tuple(float(r) for r in ratios.split(",")) if ratios else None
        opts = GroupOptions(model=model, devices=devices, local_workers=local_workers, host=host, port=port,
                            context=context, threads=threads, backend=backend, memory_budget=parse_size(memory_budget),
                            ratios=parsed, wire_dtype=wire_dtype, insecure=insecure, config_dir=config_dir,
                            cache_dir=cache_dir)
        group = start_group(opts, say=lambda m: typer.echo(m, err=True))
        _serve_api(group, api_host, api_port, api_key)
    except ValueError:
        fail(TpiError(f"--ratios '{ratios}' must be numbers separated by commas, e.g. 2,1"))
    except TpiError as e:
        fail(e)
    finally:
        if group is not None:
            group.close()


def _serve_api(group, host: str, port: int, api_key: str | None) -> None:
    try:
        from tpi.api import serve_api
        from tpi.service import GenerationService
    except ImportError:  # the API module is optional until it lands; keep the group up
        typer.echo("serving the group (no API available); press Ctrl-C to stop", err=True)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
        return
    service = GenerationService(group.engine, status=group.status)
    typer.echo(f"OpenAI-compatible API on http://{host}:{port}/v1", err=True)
    serve_api(service, host, port, api_key=api_key)


def join(
    master: Annotated[str, typer.Argument(help="HOST:PORT printed by tpi serve")],
    token: Annotated[str, typer.Option("--token", help="join token printed by tpi serve", envvar="TPI_TOKEN")] = "",
    name: Annotated[str, typer.Option("--name", help="device name shown on the master")] = platform.node() or "device",
    memory_budget: Budget = None,
    cache_dir: CacheDir = DEFAULT_CACHE_DIR,
    key_dir: Annotated[Path, typer.Option("--key-dir", help="where this device's keypair lives", envvar="TPI_CONFIG_DIR")] = DEFAULT_CONFIG_DIR,
    threads: Threads = None,
    backend: Backend = "torch",
    insecure: Insecure = False,
    data_endpoint: Annotated[Optional[str], typer.Option(
        "--data-endpoint", help="HOST:PORT of the master's data channel when a proxy or NAT sits between "
        "(default: the master's address, port+1)")] = None,
) -> None:
    """Join a group as a worker: fetch and cache the shard, then compute steps until stopped."""
    from tpi.worker import WorkerOptions, run_worker

    try:
        if not token:
            raise TpiError("no join token; copy the --token value that tpi serve printed")
        run_worker(WorkerOptions(master=master, token=token, name=name, cache_dir=cache_dir / "shards",
                                 key_dir=key_dir, backend=backend, threads=threads,
                                 memory_budget=parse_size(memory_budget), insecure=insecure,
                                 data_endpoint=data_endpoint))
    except TpiError as e:
        fail(e)
    except KeyboardInterrupt:
        typer.echo("left the group", err=True)


@token_app.command("show")
def token_show(config_dir: ConfigDir = DEFAULT_CONFIG_DIR) -> None:
    """Print the current join token."""
    from tpi.transport.security import master_token

    typer.echo(master_token(config_dir))


@token_app.command("rotate")
def token_rotate(config_dir: ConfigDir = DEFAULT_CONFIG_DIR) -> None:
    """Issue a new join token; devices already admitted stay admitted."""
    from tpi.transport.security import rotate_token

    typer.echo(rotate_token(config_dir))


def register(app: typer.Typer) -> None:
    app.command()(serve)
    app.command()(join)
    app.add_typer(token_app, name="token")
