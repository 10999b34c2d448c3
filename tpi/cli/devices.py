"""Device commands: `tpi plan` (predict before loading), `tpi devices` (a running group), `tpi devices profile`."""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Annotated, Optional

import typer

from tpi.cli.options import DEFAULT_CACHE_DIR, Backend, CacheDir, Experts, Threads, WireDtype, reports_errors
from tpi.errors import GroupError, TpiError

devices_app = typer.Typer(help="Devices of a running group, and this device's profile.")
GB = 1e9


def load_model_config(model: str):
    """(config, weight format, weight profile) of a GGUF/HF path (metadata only), or of a named
    shape like llama-2-70b (format and profile None)."""
    # imported when the command runs: keeps `tpi --help` fast
    from tpi.devices.shapes import model_shape

    if Path(model).expanduser().exists():
        from tpi.devices.group_plan import weight_format_of, weight_profile_of  # a file: read its headers
        from tpi.formats import open_model

        source = open_model(model)
        return source.config, weight_format_of(source), weight_profile_of(source)
    return model_shape(model), None, None


@reports_errors
def plan(
    model: Annotated[str, typer.Argument(help="GGUF file, Hugging Face folder, or a named shape (llama-2-70b, llama-3-8b, qwen2.5-72b, ...)")],
    devices: Annotated[Path, typer.Option("--devices", help="TOML file of [[device]] tables; the first is the master")],
    weights: Annotated[Optional[str], typer.Option("--weights", help="weight format: int4 or bf16, uniform (default: the file's own types, int4 for a named shape)")] = None,
    context: Annotated[int, typer.Option("--context", "-c", help="context length to plan the KV cache for")] = 2048,
    prompt_tokens: Annotated[int, typer.Option("--prompt-tokens", help="prompt length for the TTFT prediction")] = 128,
    no_streaming: Annotated[bool, typer.Option("--no-streaming", help="refuse plans that stream weights from disk")] = False,
    wire_dtype: WireDtype = None,
    speculate: Annotated[str, typer.Option("--speculate", help="plan for speculative decoding as run/serve do it: auto (default; the group is chosen for its speculative ms/token on prompt-grounded tasks), lookup (8 drafts a step), off (plain decoding)")] = "auto",
    acceptance: Annotated[Optional[float], typer.Option("--acceptance", help="share of drafted tokens the model keeps on prompt-grounded tasks (default: 0.7 assumed; measured: tpi run --stats, spec_acceptance_per_draft)")] = None,
    wired: Annotated[bool, typer.Option("--wired", help="the master's link is wired full duplex (sends and receives at once); default: Wi-Fi, one direction at a time")] = False,
    experts: Experts = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the plan and prediction as JSON (for scripts)")] = False,
) -> None:
    """Will MODEL run on these devices, and how fast? Prints the plan and predictions; loads no weights."""
    # imported when the command runs: keeps `tpi --help` fast
    from tpi.cli.table_text import print_tables
    from tpi.devices.plan_report import plan_command, plan_json, plan_tables
    from tpi.devices.speculation_cost import ASSUMED_ACCEPTANCE, PLAN_MODES, SpeculationPlan
    from tpi.master.options import check_experts, check_wire_dtype

    if weights not in (None, "int4", "bf16"):
        raise TpiError(f"--weights {weights!r} must be int4 or bf16")
    check_wire_dtype(wire_dtype)
    if acceptance is not None and not 0.0 <= acceptance < 1.0:
        raise TpiError(f"--acceptance {acceptance} must be a share in [0, 1), e.g. 0.7")
    if speculate not in PLAN_MODES:
        raise TpiError(f"--speculate {speculate!r} is not a mode; use one of {', '.join(PLAN_MODES)}")
    speculation = SpeculationPlan(speculate, ASSUMED_ACCEPTANCE if acceptance is None else acceptance,
                                  given=acceptance is not None)
    check_experts(experts)
    if context < 8 or prompt_tokens < 1 or prompt_tokens > context:
        raise TpiError("--context must be >= 8 and --prompt-tokens between 1 and the context")
    cfg, file_format, profile = load_model_config(model)
    planned = plan_command(cfg, devices, weight_format=weights or file_format or "int4", context=context,
                           prompt_tokens=prompt_tokens, allow_streaming=not no_streaming, wire_dtype=wire_dtype,
                           weights=None if weights else profile, experts=experts, master_full_duplex=wired,
                           speculation=speculation)
    if as_json:
        typer.echo(json.dumps(plan_json(planned), indent=1))
    else:
        print_tables(*plan_tables(planned))


def fetch_status(url: str, api_key: str | None, timeout_s: float = 5.0) -> dict:
    """The group status a running `tpi serve` reports (GET /health; 503 while the group forms)."""
    req = urllib.request.Request(url.rstrip("/") + "/health")
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        if e.code == 503:  # still forming: the body still describes the group
            return json.loads(e.read())
        hint = "pass --api-key (or TPI_API_KEY)" if e.code == 401 else "is it a tpi serve API?"
        raise GroupError(f"{url} answered HTTP {e.code} for the group status; {hint}") from e
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise GroupError(f"cannot reach tpi serve at {url} ({e}); start it, or pass its API address with --url") from e


def render_devices(status: dict):
    """One row per device: profile, assigned share, memory and link figures."""
    # imported when the command runs: keeps `tpi --help` fast
    from rich.table import Table

    group = status.get("group", status)
    summary = group.get("plan") or {}
    title = f"{group.get('model', status.get('model', '?'))}: {group.get('world', '?')} devices, {group.get('state', '?')}"
    table = Table(title=title)
    for col in ("rank", "device", "address", "backend", "cores", "int4 GFLOP/s", "free GB", "share", "heads",
                "peak / budget GB (predicted)", "link RTT ms", "link Mbit/s"):
        table.add_column(col, justify="left" if col in ("device", "address", "backend") else "right")
    for d in group.get("devices", []):
        prof, plan, share = d.get("profile") or {}, d.get("plan") or {}, d.get("share") or {}
        link = plan.get("link") or {}
        heads = share.get("q_heads") or plan.get("q_heads") or ["?", "?"]
        table.add_row(
            str(d.get("rank", "?")), str(d.get("name", "?")), str(d.get("address", "")), str(prof.get("backend", "-")),
            str(prof.get("cores", "-")), _num(prof.get("int4_gflops"), "{:.1f}"),
            _num(prof.get("free_memory_bytes"), "{:.2f}", GB), _num(plan.get("ratio"), "{:.3f}"),
            f"{heads[0]}-{heads[1] - 1}" if isinstance(heads[1], int) else "-",
            f"{_num(plan.get('predicted_peak_bytes'), '{:.2f}', GB)} / {_num(plan.get('budget_bytes'), '{:.2f}', GB)}",
            _num(link.get("rtt_ms"), "{:.2f}"), _num(link.get("mbit_s"), "{:.0f}"),
        )
    lines = []
    if "slots" in status:  # the service's load: /health of tpi serve
        slots = status["slots"]
        lines.append(f"requests: {status.get('running', 0)} running in {slots} slot{'s' if slots != 1 else ''}, "
                     f"{status.get('queued', 0)} queued" + (f" of at most {status['queue_size']} (--queue-size)"
                                                            if "queue_size" in status else ""))
    spec = status.get("speculation") or {}
    if spec.get("mode", "off") != "off":  # the figures /health and `tpi run --stats` name
        lines.append(f"speculation: {spec['mode']} ({spec.get('drafter', '?')}), "
                     f"{_num(spec.get('spec_acceptance_per_draft'), '{:.0%}')} of drafts kept "
                     f"(spec_acceptance_per_draft), {_num(spec.get('tokens_per_forward'), '{:.2f}')} tokens per forward "
                     f"over {spec.get('spec_forwards', 0)} forwards")
    if summary:
        lines.append(f"predicted {summary.get('predicted_token_ms', '?')} ms/token, bound by "
                     f"{summary.get('bound_by', '?')}; {summary.get('weight_format', '?')} weights, "
                     f"{summary.get('wire_dtype', '?')} on the wire")
    table.caption = "\n".join(lines) or None
    return table


def _num(value, fmt: str, scale: float = 1.0) -> str:
    return fmt.format(value / scale) if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


@devices_app.callback(invoke_without_command=True)
@reports_errors
def devices(
    ctx: typer.Context,
    url: Annotated[str, typer.Option("--url", help="API address of the running tpi serve")] = "http://127.0.0.1:8000",
    api_key: Annotated[Optional[str], typer.Option("--api-key", help="Bearer key of the API", envvar="TPI_API_KEY")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the raw status JSON")] = False,
) -> None:
    """List the devices of a running group: profile, assigned share, memory and link figures."""
    if ctx.invoked_subcommand is not None:
        return
    # imported when the command runs: keeps `tpi --help` fast
    from tpi.cli.table_text import print_tables

    status = fetch_status(url, api_key)
    if as_json:
        typer.echo(json.dumps(status, indent=1))
    else:
        print_tables(render_devices(status))


@devices_app.command("profile")
@reports_errors
def devices_profile(
    backend: Backend = "auto",
    threads: Threads = None,
    cache_dir: CacheDir = DEFAULT_CACHE_DIR,
    as_json: Annotated[bool, typer.Option("--json", help="print the profile as JSON (for tpi join --profile-file)")] = False,
) -> None:
    """Measure this device again (a few seconds) and cache it for `tpi join`."""
    # imported when the command runs: keeps `tpi --help` fast
    from rich.table import Table

    from tpi.cli.table_text import print_tables

    from tpi.devices.profile import cached_or_measured
    from tpi.model.backends import resolve_backend

    backend = resolve_backend(backend)
    profile = cached_or_measured(cache_dir / "profile", backend=backend, threads=threads, refresh=True)
    if as_json:
        typer.echo(json.dumps(profile.to_dict(), indent=1))
        return
    table = Table(title=f"device profile of {profile.name} (cached in {cache_dir / 'profile'})")
    table.add_column("measure")
    table.add_column("value", justify="right")
    rows = [("OS", profile.os), ("cores", str(profile.cores)), ("backend", profile.backend),
            ("int4 matmul GFLOP/s (1 token)", f"{profile.int4_gflops:.1f}"),
            ("bf16 matmul GFLOP/s (1 token)", f"{profile.bf16_gflops:.1f}"),
            ("prefill GFLOP/s (64 tokens)", f"{profile.prefill_gflops:.1f}"),
            ("memory bandwidth GB/s", f"{profile.memory_gbs:.1f}"), ("disk read MB/s", f"{profile.disk_mb_s:.0f}"),
            ("free / total memory GB", f"{profile.free_memory_bytes / GB:.2f} / {profile.total_memory_bytes / GB:.2f}"),
            ("runtime memory MB", f"{profile.runtime_bytes / 1e6:.0f}")]
    for k, v in rows:
        table.add_row(k, v)
    print_tables(table)


def register(app: typer.Typer) -> None:
    app.command()(plan)
    app.add_typer(devices_app, name="devices")
