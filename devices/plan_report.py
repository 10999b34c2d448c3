"""`tpi plan`: read a devices file, plan the group, and show the prediction as Rich tables."""
from __future__ import annotations

import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from rich.table import Table

from tpi.model.config import ModelConfig
from tpi.devices.group_plan import device_status, plan_summary
from tpi.devices.costmodel import (WIRE_BYTES, CostParams, LinkProfile, Prediction, WeightProfile, compare_allreduce,
                                   rank_load, star_terms, wire_convert_s)
from tpi.devices.planner import GroupPlan, PlanDevice, plan_group
from tpi.devices.profile import DeviceProfile
from tpi.devices.shapes import model_shape
from tpi.devices.speculation_cost import SpeculationPlan
from tpi.devices.speculation_cost import assumptions as speculation_assumptions
from tpi.errors import GroupError, ProtocolError

GB = 1e9
MAX_DEVICES = 1024

# Fields of one [[device]] entry: name -> (required, default).
_DEVICE_FIELDS: dict[str, tuple[bool, Any]] = {
    "name": (True, None), "memory_gb": (True, None), "int4_gflops": (True, None), "bf16_gflops": (True, None),
    "disk_mb_s": (True, None), "link_rtt_ms": (True, None), "link_mbit": (True, None),
    "prefill_gflops": (False, None),  # default: 2 x bf16_gflops (prompt matmuls batch well)
    "memory_gbs": (False, 20.0), "cores": (False, 4), "backend": (False, "torch"), "os": (False, "planned"),
    "count": (False, 1),  # expand into name-1 .. name-N identical devices
}

EXAMPLE_DEVICES_TOML = """\
# devices.toml: the first device is the master (rank 0); link_* is its link to the master
# (for the master itself: its own network uplink).
[[device]]
name = "laptop"
memory_gb = 8
int4_gflops = 100
bf16_gflops = 40
disk_mb_s = 500
link_rtt_ms = 1
link_mbit = 300
count = 8
"""


def _number(entry: dict, key: str, where: str, lo: float, hi: float) -> float:
    value = entry[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise GroupError(f"{where}: '{key}' must be a number in [{lo}, {hi}], got {value!r}")
    return float(value)


def _device_from_entry(entry: Any, where: str) -> list[PlanDevice]:
    if not isinstance(entry, dict):
        raise GroupError(f"{where} must be a table with name, memory_gb, int4_gflops, ...")
    unknown = sorted(set(entry) - set(_DEVICE_FIELDS))
    missing = sorted(k for k, (req, _) in _DEVICE_FIELDS.items() if req and k not in entry)
    if unknown or missing:
        raise GroupError(f"{where}: missing fields {missing}, unknown fields {unknown}; "
                         f"known fields: {', '.join(_DEVICE_FIELDS)}")
    e = {k: entry.get(k, default) for k, (_, default) in _DEVICE_FIELDS.items()}
    count = e["count"]
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_DEVICES:
        raise GroupError(f"{where}: 'count' must be an integer in [1, {MAX_DEVICES}]")
    memory = _number(e, "memory_gb", where, 0.01, 1e6) * GB
    bf16 = _number(e, "bf16_gflops", where, 1e-3, 1e7)
    prefill = bf16 * 2 if e["prefill_gflops"] is None else _number(e, "prefill_gflops", where, 1e-3, 1e7)
    link = LinkProfile.from_ms_mbit(_number(e, "link_rtt_ms", where, 0.0, 1e5),
                                    _number(e, "link_mbit", where, 1e-3, 1e7))
    devices = []
    for i in range(count):
        fields = {
            "name": e["name"] if count == 1 else f"{e['name']}-{i + 1}", "os": e["os"], "cores": e["cores"],
            "total_memory_bytes": int(memory), "free_memory_bytes": int(memory), "backend": e["backend"],
            "int4_gflops": e["int4_gflops"], "bf16_gflops": bf16, "prefill_gflops": prefill,
            "memory_gbs": e["memory_gbs"], "disk_mb_s": e["disk_mb_s"], "measured_at": 0.0,
        }
        try:
            profile = DeviceProfile.from_dict(fields)
        except ProtocolError as exc:
            raise GroupError(f"{where}: {exc}") from exc
        devices.append(PlanDevice(profile, link))
    return devices


def load_devices_file(path: Path | str) -> tuple[PlanDevice, ...]:
    """Devices from a TOML file of [[device]] tables; the first one is the master."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise GroupError(f"cannot read devices file {path}: {exc.strerror}; write one like:\n{EXAMPLE_DEVICES_TOML}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise GroupError(f"devices file {path} is not valid TOML ({exc})") from exc
    entries = data.get("device")
    if not isinstance(entries, list) or not entries:
        raise GroupError(f"devices file {path} has no [[device]] tables; write one like:\n{EXAMPLE_DEVICES_TOML}")
    devices: list[PlanDevice] = []
    for i, entry in enumerate(entries):
        devices += _device_from_entry(entry, f"{path} device #{i + 1}")
    if len(devices) > MAX_DEVICES:
        raise GroupError(f"devices file {path} describes {len(devices)} devices; at most {MAX_DEVICES}")
    names = [d.name for d in devices]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise GroupError(f"devices file {path} repeats device names {dupes}; names must be unique")
    return tuple(devices)


def _gb(nbytes: float) -> str:
    return f"{nbytes / GB:.2f}"


def render_plan(plan: GroupPlan, prediction: Prediction | None = None) -> Table:
    """One row per rank: its slice, memory and predicted per-token times; summary in the caption."""
    pred = prediction or plan.prediction
    types = pred.params.weights.types if pred.params.weights and pred.params.weights.types else plan.weight_format
    table = Table(title=f"{plan.model}: {len(plan.devices)} devices, {types} weights, "
                        f"{plan.wire_dtype} on the wire (model prediction)")
    for col, justify in (("rank", "right"), ("device", "left"), ("ratio", "right"), ("q heads", "right"),
                         ("kv heads", "right"), ("inter cols", "right"), ("vocab rows", "right"),
                         ("pinned GB", "right"), ("streamed GB/tok", "right"), ("peak / budget GB", "right"),
                         ("compute ms", "right"), ("disk ms", "right")):
        table.add_column(col, justify=justify)
    for shard, ratio, r in zip(plan.shards, plan.ratios, pred.ranks):
        table.add_row(
            str(r.rank), r.name, f"{ratio:.3f}", f"{shard.q_heads.start}-{shard.q_heads.stop - 1}",
            ",".join(map(str, shard.kv_heads)), str(len(shard.inter)), str(len(shard.vocab)),
            _gb(r.pinned_bytes), _gb(r.streamed_bytes), f"{_gb(r.peak_memory_bytes)} / {_gb(r.budget_bytes)}",
            f"{r.compute_s * 1e3:.1f}", f"{r.stream_s * 1e3:.1f}",
        )
    lines = [
        f"token latency {pred.token_latency_s * 1e3:.1f} ms ({pred.tokens_per_s:.2f} tok/s), "
        f"TTFT {pred.ttft_s:.2f} s for {pred.params.prompt_tokens} prompt tokens, "
        f"communication {pred.comm_per_token_s * 1e3:.1f} ms/token, bound by {pred.bottleneck}",
    ]
    lines += decode_lines(plan) if prediction is None else []
    lines.append(plan.granularity)
    lines += moe_lines(plan, pred)
    lines += [f"left out {name}: {why}" for name, why in plan.excluded]
    table.caption = "\n".join(lines)
    return table


def link_words(plan: GroupPlan) -> str:
    """The links the prediction assumes, in plain words: the master's duplex above all."""
    params, links = plan.prediction.params, [d.link for d in plan.devices]
    if len(links) < 2:
        return "one device: no links"
    master = links[0]
    duplex = ("wired, full duplex: it sends and receives at once (--wired)" if params.master_full_duplex else
              "Wi-Fi-like, one direction at a time: a star allreduce's 2(N-1) messages share it "
              "(the default; --wired for a full-duplex switch port)")
    rtts = sorted({round(l.rtt_s * 1e3, 3) for l in links[1:]})
    rtt = f"{rtts[0]:g}" if len(rtts) == 1 else f"{rtts[0]:g}-{rtts[-1]:g}"
    return (f"assumed links: the master's {master.bandwidth_bytes_s * 8 / 1e6:.0f} Mbit uplink is {duplex}; "
            f"workers' round trip {rtt} ms; {params.message_overhead_s * 1e6:.0f} µs of software per message")


def decode_lines(plan: GroupPlan) -> list[str]:
    """The headline: decode ms/token plain and with speculation, what the group is chosen for, the assumptions."""
    lines = [link_words(plan)]
    spec = plan.speculation
    if spec is None:
        return lines
    plain = plan.prediction.token_latency_s * 1e3
    if not spec.on:
        return [f"decode {plain:.1f} ms/token plain, the figure the group is chosen for; {spec.words()}"] + lines
    e = spec.estimate(plan)
    fast = (f"{e.token_s * 1e3:.1f} ms/token with speculation (k = {e.k}, {e.tokens_per_step:.2f} tokens per step)"
            if e.k else f"{plain:.1f} ms/token with speculation too (no k gains enough: auto stays plain)")
    if plan.plain_guard:  # speculation assumed, but the group is the plain choice's (planner.PLAIN_SLACK)
        return [f"decode: prompt-grounded tasks {fast}; open-ended tasks {plain:.1f} ms/token plain, the figure the "
                f"group is chosen for: {plan.plain_guard}", f"{spec.words()}"] + lines
    return [f"decode: prompt-grounded tasks {fast}, the figure the group is chosen for; open-ended tasks "
            f"{plain:.1f} ms/token plain", f"{spec.words()}"] + lines


def moe_lines(plan: GroupPlan, pred: Prediction) -> list[str]:
    """A MoE plan's expert figures: stored expert bytes against those a token reads, the placement and why."""
    cfg = plan.config
    if not cfg.is_moe:
        return []
    loads = [rank_load(cfg, s, pred.params) for s in plan.shards]
    held = sum(l.expert_bytes for l in loads) * cfg.n_layers
    read = max(l.active_expert_bytes for l in loads) * cfg.n_layers
    lines = [f"experts: {cfg.n_experts} per layer, top {cfg.n_experts_used}; {_gb(held)} GB held across the group, "
             f"{_gb(read)} GB read per token on the busiest rank"]
    if plan.experts_reason and len(plan.shards) > 1:
        lines.append(f"experts placed {plan.experts_placement}: {plan.experts_reason}")
    return lines


def render_wires(plan: GroupPlan) -> Table | None:
    """Each wire dtype's predicted allreduce and token latency for this plan (None for one device)."""
    if len(plan.devices) < 2 or not plan.wire_options:
        return None
    links = [d.link for d in plan.devices]
    table = Table(title="wire dtype of the partial sums (model prediction; decode allreduce of one token)")
    spec = plan.speculation if plan.speculation and plan.speculation.on else None
    for col in ("wire", "bytes", "network ms", "conversions ms", "allreduce ms", "comm ms/token", "token ms",
                *(["with speculation ms"] if spec else []), "TTFT s", ""):
        table.add_column(col, justify="left" if col in ("wire", "") else "right")
    for wire, pred in plan.wire_options:
        nbytes = plan.config.hidden * WIRE_BYTES[wire]
        net = star_terms(nbytes, links, pred.params).total_s
        conv = wire_convert_s(plan.config.hidden, len(links), wire)
        decode_s = replace(plan, wire_dtype=wire, prediction=pred).decode_s
        # against the figure the wire was chosen by: with speculation when it is on (else the columns disagree)
        ratio = decode_s / plan.decode_s if spec else pred.token_latency_s / plan.prediction.token_latency_s
        mark = "chosen" if wire == plan.wire_dtype else (
            f"{ratio:.2f}x the chosen {'ms/token with speculation' if spec else 'token time'}")
        fast = [f"{decode_s * 1e3:.1f}"] if spec else []
        table.add_row(wire, f"{nbytes:.0f}", f"{net * 1e3:.2f}", f"{conv * 1e3:.2f}", f"{pred.allreduce_s * 1e3:.2f}",
                      f"{pred.comm_per_token_s * 1e3:.1f}", f"{pred.token_latency_s * 1e3:.1f}", *fast,
                      f"{pred.ttft_s:.2f}", mark)
    table.caption = plan.wire_reason
    return table


def render_allreduce(plan: GroupPlan) -> Table | None:
    """Star vs ring for one decode allreduce of this group (None for a single device)."""
    links = [d.link for d in plan.devices]
    if len(links) < 2:
        return None
    params = plan.prediction.params
    nbytes = int(plan.config.hidden * WIRE_BYTES[params.wire_dtype])
    cmp = compare_allreduce(nbytes, links, params)
    table = Table(title=f"one decode allreduce ({nbytes} bytes, {cmp.n_ranks} ranks, model prediction)")
    table.add_column("algorithm")
    table.add_column("ms", justify="right")
    table.add_row("star (used)", f"{cmp.star_s * 1e3:.2f}")
    table.add_row("ring", f"{cmp.ring_s * 1e3:.2f}")
    return table


def _shown(plan: GroupPlan, acceptance: float | None) -> SpeculationPlan:
    """The speculation the tables show: the plan's own (auto's when it planned for plain decoding),
    at `acceptance` when one is given."""
    spec = plan.speculation if plan.speculation and plan.speculation.on else SpeculationPlan()
    return spec if acceptance is None else replace(spec, acceptance=acceptance, given=True)


def render_speculation(plan: GroupPlan, acceptance: float | None = None) -> Table:
    """Predicted ms/token without and with speculative decoding: open-ended tasks (auto stays plain),
    prompt-grounded ones at the assumed acceptance and around it."""
    spec = _shown(plan, acceptance)
    table = Table(title="speculative decoding (model prediction; k drafts verified as one step of k+1 rows)")
    for col in ("task", "drafts kept", "best k", "tokens/step", "step ms", "ms/token", ""):
        table.add_column(col, justify="left" if col in ("", "task") else "right")
    plain = spec.estimate(plan, 0.0)
    table.add_row("open-ended (stories, chat)", "few", "0", "1.00", f"{plain.step_s * 1e3:.1f}",
                  f"{plain.token_s * 1e3:.1f}", "without speculation: auto turns itself off")
    for a in sorted({0.5, spec.acceptance, 0.9}):
        e = spec.estimate(plan, a)
        mark = f"{plain.token_s / e.token_s:.2f}x faster" + (
            (" (given)" if spec.given else " (assumed)") if a == spec.acceptance else "")
        table.add_row("prompt-grounded", f"{a:.0%}", str(e.k), f"{e.tokens_per_step:.2f}", f"{e.step_s * 1e3:.1f}",
                      f"{e.token_s * 1e3:.1f}", mark)
    duplex = "wired, full duplex (--wired)" if plan.prediction.params.master_full_duplex else "one direction at a time"
    table.caption = (f"{plan.wire_dtype} on the wire, the master's link {duplex}; " + speculation_assumptions())
    return table


def plan_json(plan: GroupPlan, acceptance: float | None = None) -> dict[str, Any]:
    """The plan and its prediction as plain JSON (`tpi plan --json`): the group summary, one entry per rank."""
    pred = plan.prediction
    out: dict[str, Any] = {"model": plan.model, **plan_summary(plan),
                           "predicted_tokens_per_s": round(pred.tokens_per_s, 3),
                           "communication_ms_per_token": round(pred.comm_per_token_s * 1e3, 3),
                           "context": pred.params.context, "prompt_tokens": pred.params.prompt_tokens}
    if plan.config.is_moe:
        loads = [rank_load(plan.config, s, pred.params) for s in plan.shards]
        out["experts"] = {"placement": plan.experts_placement, "reason": plan.experts_reason,
                          "expert_bytes": [l.expert_bytes * plan.config.n_layers for l in loads],
                          "active_expert_bytes_per_token": [l.active_expert_bytes * plan.config.n_layers for l in loads]}
    out["devices"] = [{"rank": r, "name": d.name, **device_status(plan, r, d.link if r else None),
                       "predicted_disk_ms": round(pred.ranks[r].stream_s * 1e3, 3)}
                      for r, d in enumerate(plan.devices)]
    if len(plan.devices) > 1:
        nbytes = plan.config.hidden * WIRE_BYTES[pred.params.wire_dtype]
        cmp = compare_allreduce(nbytes, [d.link for d in plan.devices], pred.params)
        out["allreduce"] = {"bytes": nbytes, "star_ms": round(cmp.star_s * 1e3, 4), "ring_ms": round(cmp.ring_s * 1e3, 4)}
    spec = _shown(plan, acceptance)
    e = spec.estimate(plan)
    plain_ms = round(pred.token_latency_s * 1e3, 3)
    out["speculation"] = {"assumed_acceptance": spec.acceptance, "k": e.k,
                          "tokens_per_step": round(e.tokens_per_step, 3),
                          "predicted_ms_per_token": round(e.token_s * 1e3, 3),
                          "predicted_ms_per_token_without": plain_ms,
                          "mode": spec.mode,
                          "acceptance_source": "given" if spec.given else "assumed",
                          "open_ended_ms_per_token": plain_ms, "assumptions": spec.words()}
    out["objective"] = "speculative" if plan.speculation and plan.speculation.on and not plan.plain_guard else "plain"
    if plan.plain_guard:
        out["objective_reason"] = plan.plain_guard
    out["predicted_decode_ms_per_token"] = round(plan.decode_s * 1e3, 3)
    out["master_link"] = "wired full duplex" if pred.params.master_full_duplex else "one direction at a time"
    out["link_assumptions"] = link_words(plan)
    return out


def plan_command(model: str | ModelConfig, devices_path: Path | str, *, weight_format: str = "int4",
                 context: int = 2048, prompt_tokens: int = 128, allow_streaming: bool = True,
                 wire_dtype: str | None = None, weights: WeightProfile | None = None,
                 experts: str | None = None, master_full_duplex: bool = False,
                 speculation: SpeculationPlan | None = None) -> GroupPlan:
    """Plan MODEL (a shape name or a ModelConfig) on the devices in a TOML file (`tpi plan` prints it).

    weights: the model file's own types (bytes per weight and column blocks); None: weight_format's.
    speculation: what to choose the group for (None: plain decoding; `tpi plan` passes auto's).
    """
    cfg = model_shape(model) if isinstance(model, str) else model
    devices = load_devices_file(devices_path)
    params = CostParams(weight_format=weight_format, context=context, prompt_tokens=prompt_tokens,
                        kv_position=min(context, 512), weights=weights, experts=experts,
                        master_full_duplex=master_full_duplex)
    return plan_group(cfg, devices, params, allow_streaming=allow_streaming, wire_dtype=wire_dtype,
                      speculation=speculation)


def plan_tables(plan: GroupPlan, acceptance: float | None = None) -> list[Table]:
    """The tables `tpi plan` and `tpi serve` show for a plan: the ranks, the wire dtypes and the allreduce
    (the last two for a group)."""
    return [t for t in (render_plan(plan), render_wires(plan), render_allreduce(plan),
                                render_speculation(plan, acceptance))
            if t is not None]
