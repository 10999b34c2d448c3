"""Group commands: `tpi serve` (master), `tpi join` (worker), `tpi token`."""
from __future__ import annotations

import platform
import signal
import threading
from pathlib import Path
from typing import Annotated, Optional

import typer

from tpi.cli.options import (DEFAULT_CACHE_DIR, DEFAULT_CONFIG_DIR, Backend, Budget, CacheDir, ConfigDir, Context, Experts,
                             Insecure, LocalWorkers, ModelArg, Threads, WireDtype, Speculate, Draft, parse_size, reports_errors, say)
from tpi.errors import TpiError

token_app = typer.Typer(help="Manage the join token.", no_args_is_help=True)


@reports_errors
def serve(
    model: ModelArg = None,
    devices: Annotated[int, typer.Option("--devices", "-d", help="total group size to wait for, this master included")] = 1,
    local_workers: LocalWorkers = 0,
    host: Annotated[str, typer.Option("--host", help="address to listen on for devices")] = "0.0.0.0",
    port: Annotated[int, typer.Option("--port", "-p", help="control port for devices (data uses port+1)")] = 7610,
    api_host: Annotated[str, typer.Option("--api-host", help="address of the OpenAI-compatible API")] = "127.0.0.1",
    api_port: Annotated[int, typer.Option("--api-port", help="port of the API (0 = any free port, printed)")] = 8000,
    api_key: Annotated[Optional[str], typer.Option("--api-key", help="require this Bearer key on the API (not on /health)", envvar="TPI_API_KEY")] = None,
    queue_size: Annotated[int, typer.Option("--queue-size", help="requests that may wait while every --parallel slot is busy; more get 429 with Retry-After")] = 8,
    prompt_cache: Annotated[bool, typer.Option("--prompt-cache", help="reuse the previous request's cached prefix (faster multi-turn; answers may differ in the last bits)")] = False,
    parallel: Annotated[Optional[int], typer.Option("--parallel", help="requests answered at once, each with its own KV cache on every device (default on one device: as many as fit in a quarter of free memory, at most 4, 1 on torch; in a group: 1, since batched requests do not resume after a device loss yet; with --draft: 1, a draft model runs one sequence)")] = None,
    prefill_chunk: Annotated[int, typer.Option("--prefill-chunk", help="prompt tokens read per step while other requests decode (smaller: steadier tokens for the others, slower long prompts)")] = 128,
    wire_dtype: WireDtype = None,
    speculate: Speculate = "auto",
    draft: Draft = None,
    experts: Experts = None,
    ratios: Annotated[Optional[str], typer.Option("--ratios", help="split ratios by rank, e.g. 2,1 (default: planned from device profiles)")] = None,
    keep_all: Annotated[bool, typer.Option("--keep-all", help="never leave a joined device out, even if the planner predicts it slows the group")] = False,
    threads: Threads = None,
    context: Context = None,
    backend: Backend = "auto",
    memory_budget: Budget = None,
    config_dir: ConfigDir = DEFAULT_CONFIG_DIR,
    cache_dir: CacheDir = DEFAULT_CACHE_DIR,
    insecure: Insecure = False,
    heartbeat_timeout: Annotated[float, typer.Option(
        "--heartbeat-timeout", help="seconds of silence after which a device counts as lost "
        "(heartbeats go every quarter of it, at most every second)")] = 10.0,
    rejoin_timeout: Annotated[float, typer.Option(
        "--rejoin-timeout", help="seconds a lost device has to rejoin (from its cache) before the group "
        "re-plans over the remaining devices")] = 30.0,
    replan: Annotated[bool, typer.Option(
        "--replan/--no-replan", help="re-plan over the remaining devices when a lost one does not rejoin "
        "(else the group reports itself degraded and answers 503)")] = True,
    resume_timeout: Annotated[Optional[float], typer.Option(
        "--resume-timeout", help="seconds a request interrupted by a device loss waits for the group to serve "
        "again before it fails (default: the rejoin timeout + 120 s for a re-plan; a group that cannot "
        "re-form fails it at once)")] = None,
    announce: Annotated[bool, typer.Option(
        "--announce/--no-announce", help="announce the group on the LAN (mDNS) so `tpi join --token T` finds "
        "it without an address; only a hash of the master's public key is announced")] = True,
) -> None:
    """Be the master: serve the API at once, wait for devices, ship their shards, then answer."""
    # imported when the command runs: keeps `tpi --help` fast
    from tpi.master import GroupOptions
    from tpi.model.config import PREFILL_CHUNK
    from tpi.serve.api import serve_api
    from tpi.serve.service import GenerationService
    from tpi.transport.protocol import MAX_SLOTS

    try:
        parsed = tuple(float(r) for r in ratios.split(",")) if ratios else None
    except ValueError:
        raise TpiError(f"--ratios '{ratios}' must be numbers separated by commas, e.g. 2,1") from None
    if parallel is not None and not 1 <= parallel <= MAX_SLOTS:
        raise TpiError(f"--parallel {parallel} is out of range; use 1..{MAX_SLOTS}")
    if not 1 <= prefill_chunk <= PREFILL_CHUNK:
        raise TpiError(f"--prefill-chunk {prefill_chunk} is out of range; use 1..{PREFILL_CHUNK}")
    opts = GroupOptions(model=model, devices=devices, local_workers=local_workers, host=host, port=port,
                        context=context, slots=parallel or 0, threads=threads, backend=backend, memory_budget=parse_size(memory_budget),
                        ratios=parsed, wire_dtype=wire_dtype, experts=experts, insecure=insecure, config_dir=config_dir,
                        cache_dir=cache_dir, leave_out=not keep_all,
                        link_settings=link_settings(heartbeat_timeout), rejoin_timeout_s=rejoin_timeout,
                        replan=replan, resume_timeout_s=resume_timeout, announce=announce, always_plan=True,
                        speculate=speculate, draft=draft)
    forming = GroupFormation(opts)
    service = GenerationService(None, status=forming.status, queue_size=queue_size, model_name=served_model_id(model),
                                prefill_budget=prefill_chunk)
    def ready(engine) -> None:
        engine.reuse_prefix = prompt_cache
        service.attach(engine)

    forming.on_ready = ready
    # uvicorn shuts down on SIGTERM and then re-raises it; with the default handler that kills the
    # process before the finally below could tell the devices the group is over.
    previous = signal.signal(signal.SIGTERM, _leave_on_sigterm)
    try:
        serve_api(service, api_host, api_port, api_key=api_key,
                  on_listening=lambda u: typer.echo(f"OpenAI-compatible API on {u}/v1 (GET /health shows the group)", err=True),
                  on_server=forming.start)
    except ShutdownRequested:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        service.close()
        forming.close()
    if forming.error is not None:
        raise forming.error


class ShutdownRequested(Exception):
    """SIGTERM reached tpi serve after the API stopped: close the group, then exit 0."""


def _leave_on_sigterm(signum, frame) -> None:
    raise ShutdownRequested()


def link_settings(heartbeat_timeout_s: float):
    """LinkSettings for a --heartbeat-timeout: beats every quarter of it (at most 1 s apart)."""
    # imported when the command runs: keeps `tpi --help` fast
    from tpi.transport.keeper import LinkSettings

    if heartbeat_timeout_s <= 0:
        raise TpiError(f"--heartbeat-timeout {heartbeat_timeout_s} must be positive (seconds)")
    return LinkSettings(heartbeat_s=min(1.0, heartbeat_timeout_s / 4), timeout_s=heartbeat_timeout_s)


def served_model_id(model: str | None) -> str:
    """The id /v1/models shows: the model file's name without its extension."""
    # imported when the command runs: keeps `tpi --help` fast
    from tpi.formats import DEFAULT_MODEL_FILE

    return Path(model or DEFAULT_MODEL_FILE).name.removesuffix(".gguf").removesuffix(".tpis")


def show_plan(plan) -> None:
    """Print the planner's table for the real group (stderr), before any weight loads."""
    # imported when the command runs: keeps `tpi --help` fast
    from tpi.cli.table_text import print_tables
    from tpi.devices.plan_report import plan_tables

    print_tables(*plan_tables(plan), stderr=True)


class GroupFormation:
    """Forms the group on a background thread while the API already answers /health."""

    def __init__(self, opts):
        self.opts = opts
        self.group = None
        self.error: TpiError | None = None
        self.on_ready = None
        self._state = {"state": "starting", "world": opts.world, "devices": []}

    def start(self, server) -> None:
        threading.Thread(target=self._form, args=(server,), name="tpi-group-formation", daemon=True).start()

    def _form(self, server) -> None:
        # imported when the command runs: keeps `tpi --help` fast
        from tpi.master import start_group

        try:
            self.group = start_group(self.opts, on_event=self.on_event)
            self.on_ready(self.group.engine)
        except TpiError as e:
            self.error = e
            self._state["state"] = "failed"
            server.should_exit = True  # serve exits and reports the error

    def on_event(self, event) -> None:
        # imported when the command runs: keeps `tpi --help` fast
        from tpi.master.events import DeviceJoined, GroupPlanned, WaitingForDevices

        if isinstance(event, WaitingForDevices):
            self._state["state"] = "waiting for devices"
        elif isinstance(event, DeviceJoined):
            self._state["devices"].append(f"{event.name} ({event.address}) [{event.count}/{event.needed}]")
        if isinstance(event, GroupPlanned):
            show_plan(event.plan)
        else:
            say(event)

    def status(self) -> dict:
        return self.group.status() if self.group is not None else dict(self._state)

    def close(self) -> None:
        if self.group is not None:
            self.group.close()


@reports_errors
def join(
    master: Annotated[Optional[str], typer.Argument(
        help="HOST:PORT printed by tpi serve (default: find the master of this token on the LAN by mDNS)")] = None,
    token: Annotated[str, typer.Option("--token", help="join token printed by tpi serve (or set TPI_TOKEN, "
                                       "or use --token-file, to keep it off the command line)", envvar="TPI_TOKEN")] = "",
    token_file: Annotated[Optional[Path], typer.Option(
        "--token-file", help="read the join token from this file ('-': the first line of stdin)")] = None,
    discover_timeout: Annotated[float, typer.Option(
        "--discover-timeout", help="seconds to look for the master on the LAN when no HOST:PORT is given")] = 15.0,
    name: Annotated[str, typer.Option("--name", help="device name shown on the master")] = platform.node() or "device",
    memory_budget: Budget = None,
    cache_dir: CacheDir = DEFAULT_CACHE_DIR,
    key_dir: Annotated[Path, typer.Option("--key-dir", help="where this device's keypair lives", envvar="TPI_CONFIG_DIR")] = DEFAULT_CONFIG_DIR,
    threads: Threads = None,
    backend: Backend = "auto",
    insecure: Insecure = False,
    data_endpoint: Annotated[Optional[str], typer.Option(
        "--data-endpoint", help="HOST:PORT of the master's data channel when a proxy or NAT sits between "
        "(default: the master's address, port+1)")] = None,
    profile_file: Annotated[Optional[Path], typer.Option(
        "--profile-file", help="send this device profile (JSON, as `tpi devices profile --json` prints) "
        "instead of the measured one")] = None,
    heartbeat_timeout: Annotated[Optional[float], typer.Option(
        "--heartbeat-timeout", help="seconds of silence after which the master counts as lost "
        "(default: the master's --heartbeat-timeout)")] = None,
    reconnect_timeout: Annotated[float, typer.Option(
        "--reconnect-timeout", help="seconds to keep reconnecting to a lost master before giving up")] = 60.0,
) -> None:
    """Join a group as a worker: fetch and cache the shard, then compute steps until stopped."""
    try:  # a KeyboardInterrupt is how a user leaves the group
        token = read_token(token, token_file)
        if heartbeat_timeout is not None and heartbeat_timeout <= 0:
            raise TpiError(f"--heartbeat-timeout {heartbeat_timeout} must be positive (seconds)")
        run_join(master, token, name, cache_dir, key_dir, threads=threads, backend=backend,
                 memory_budget=parse_size(memory_budget), insecure=insecure, profile_file=profile_file,
                 discover_timeout=discover_timeout, data_endpoint=data_endpoint,
                 heartbeat_timeout=heartbeat_timeout, reconnect_timeout=reconnect_timeout)
    except KeyboardInterrupt:
        typer.echo("left the group", err=True)


def run_join(master: str | None, token: str, name: str, cache_dir: Path, key_dir: Path, *, threads: int | None,
             backend: str, memory_budget: int | None, insecure: bool, profile_file: Path | None,
             discover_timeout: float = 15.0, data_endpoint: str | None = None,
             heartbeat_timeout: float | None = None, reconnect_timeout: float = 60.0) -> None:
    """`tpi join` once its options are read (also a local worker's, tpi.cli.local_worker)."""
    # imported when the command runs: keeps `tpi --help` fast
    import logging

    from tpi.devices.profile import handshake_profile
    from tpi.model.backends import backend_choice_note, resolve_backend
    from tpi.worker import WorkerOptions, run_worker

    requested, backend = backend, resolve_backend(backend)
    logging.getLogger("tpi.worker").info(backend_choice_note(requested, backend))
    if master is None:
        from tpi.transport.discovery import find_master  # zeroconf: only without an address

        master = find_master(token, discover_timeout).endpoint
    profile = handshake_profile(cache_dir / "profile", backend=backend, threads=threads, name=name,
                                memory_budget=memory_budget, profile_file=profile_file)
    run_worker(WorkerOptions(master=master, token=token, name=name, cache_dir=cache_dir / "shards",
                             key_dir=key_dir, backend=backend, threads=threads,
                             memory_budget=memory_budget, insecure=insecure, profile=profile,
                             data_endpoint=data_endpoint, heartbeat_timeout_s=heartbeat_timeout,
                             reconnect_s=max(0.0, reconnect_timeout)))


def read_token(token: str, token_file: Path | None) -> str:
    """The join token from --token / TPI_TOKEN, or from --token-file ('-' = stdin); TpiError when absent."""
    # imported when the command runs: keeps `tpi --help` fast
    import sys

    if token_file is not None:
        if token:
            raise TpiError("both --token (or TPI_TOKEN) and --token-file are given; give the token once")
        try:
            text = sys.stdin.readline() if str(token_file) == "-" else token_file.read_text()
        except OSError as e:
            raise TpiError(f"cannot read the token file {token_file}: {e.strerror or e}") from None
        token = text.strip().splitlines()[0] if text.strip() else ""
        if not token:
            raise TpiError(f"the token file {token_file} is empty; write the token tpi serve printed into it")
    if not token:
        raise TpiError("no join token; pass the token tpi serve printed with --token, TPI_TOKEN or --token-file")
    from tpi.transport.security import parse_token  # lazy: keeps `tpi --help` fast

    parse_token(token)  # a mistyped token fails now, before the device spends seconds measuring itself
    return token.strip()


@token_app.command("show")
def token_show(config_dir: ConfigDir = DEFAULT_CONFIG_DIR) -> None:
    """Print the current join token."""
    # imported when the command runs: keeps `tpi --help` fast
    from tpi.transport.security import master_token

    typer.echo(master_token(config_dir))


@token_app.command("rotate")
def token_rotate(config_dir: ConfigDir = DEFAULT_CONFIG_DIR) -> None:
    """Issue a new join token; devices already admitted stay admitted."""
    # imported when the command runs: keeps `tpi --help` fast
    from tpi.transport.security import rotate_token

    typer.echo(rotate_token(config_dir))


def register(app: typer.Typer) -> None:
    app.command()(serve)
    app.command()(join)
    app.add_typer(token_app, name="token")
