"""Plan a real group: turn join handshakes and link probes into planner input, and the plan into status.

`tpi serve` calls this between collecting joins and cutting shards; `tpi plan` uses the planner
directly on hypothetical devices. Untrusted profiles are validated here: a device whose profile
does not validate is refused with the reason, never planned with.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from tpi.model.config import ModelConfig, layer_name
from tpi.devices.costmodel import CostParams, LinkProfile, WeightProfile
from tpi.devices.planner import GroupPlan, PlanDevice, plan_group, plan_with_ratios
from tpi.devices.profile import DeviceProfile
from tpi.errors import GroupError, ProtocolError
from tpi.model.backends import backend_refusal
from tpi.quant.formats import bytes_per_weight, ggml_type_info, is_ggml, k_block

# A device that did not answer the link probe is planned as if on home Wi-Fi.
ASSUMED_LINK = LinkProfile.from_ms_mbit(5.0, 100.0)
# Calibrated with bench/costmodel.py on the shared 2-core VM (docs/scaling.md, "Validation"):
# per-layer decode cost beyond the matmuls (norms, RoPE, attention, op dispatch; the 1-device
# rows implied 260-640 us), and per message through the master (send, wake-up of the peer on a
# busy CPU, decode: the loopback rows implied 500-530 us, 5x an idle zmq round trip). The
# runtime's own memory is measured per device (DeviceProfile.runtime_bytes); 400 MB is the
# fallback for a profile without it.
CALIBRATED = dict(layer_overhead_s=300e-6, message_overhead_s=500e-6, runtime_overhead_bytes=400 << 20)


@dataclass(frozen=True)
class Candidate:
    """A device that joined: its name, raw handshake profile, measured link, and whether it must stay."""

    name: str
    profile: Any  # untrusted dict from the handshake
    link: LinkProfile | None  # None: it did not answer the probe
    keep: bool = False  # local workers the user asked for explicitly are never left out


@dataclass(frozen=True)
class RealPlan:
    """The plan for the devices that stay, and why the others were turned away."""

    plan: GroupPlan
    ranks: tuple[int, ...]  # candidate index of ranks 1..N-1, in rank order
    refused: tuple[tuple[int, str], ...]  # (candidate index, reason for the device's user)


def weight_profile_of(source) -> WeightProfile:
    """Each matrix's bytes per weight by its real type (mean over layers) and the blocks along K of
    wo and w_down (max over layers), from the source's headers (a tpi.formats.ModelSource)."""
    fmt_of = source.weight_fmt
    cfg = source.config
    h, q, kv, ff = cfg.hidden, cfg.q_dim, cfg.kv_dim, cfg.intermediate
    shapes = {"wq": (q, h), "wk": (kv, h), "wv": (kv, h), "wo": (h, q), "w_gate": (ff, h), "w_up": (ff, h),
              "w_down": (h, ff), "lm_head": (cfg.vocab, h)}
    stored = {}  # a MoE model's MLP matrices are its stacked experts (tpi.model.moe)
    if cfg.is_moe:
        e, eff = cfg.n_experts, cfg.expert_ff
        shapes |= {"w_gate": (e * eff, h), "w_up": (e * eff, h), "w_down": (e * h, eff)}
        stored = {"w_gate": "w_gate_exps", "w_up": "w_up_exps", "w_down": "w_down_exps"}
    fmts = {m: [fmt_of(layer_name(i, stored.get(m, m))) for i in range(cfg.n_layers)] for m in shapes if m != "lm_head"}
    fmts["lm_head"] = [fmt_of("embed" if cfg.tied_embeddings else "lm_head")]
    type_bytes: dict[str, float] = {}  # type name -> bytes of the model in it, for the label
    for m, fs in fmts.items():
        for f in fs:
            name = ggml_type_info(f).name if is_ggml(f) or f in ("f32", "bf16") else f
            type_bytes[name] = type_bytes.get(name, 0.0) + shapes[m][0] * shapes[m][1] * bytes_per_weight(f)
    total = sum(type_bytes.values())
    label = ", ".join(f"{t} {b / total:.0%}" for t, b in sorted(type_bytes.items(), key=lambda kv: -kv[1]))
    return WeightProfile(
        bytes_per_weight=tuple((m, sum(map(bytes_per_weight, fs)) / len(fs)) for m, fs in fmts.items()),
        wo_block=max(map(k_block, fmts["wo"])), down_block=max(map(k_block, fmts["w_down"])), types=label)


def weight_format_of(source) -> str:
    """'int4' (the profile's int4 matmul rate) for weights under 6 bits (Q4/Q5/K-quants below Q6_K,
    q4g32), else 'bf16' (the conservative rate)."""
    return "int4" if weight_profile_of(source)["w_gate"] < 0.75 else "bf16"


def load_transient_bytes(source, cfg: ModelConfig) -> int:
    """Rank 0's extra memory while cutting shards: the model file's pages it maps and reads, plus
    the int32 unpack buffer of the largest matrix (the vocabulary one) when kernels are prepared."""
    try:
        file_bytes = Path(source.path).stat().st_size if Path(source.path).is_file() else 0
    except OSError:
        file_bytes = 0
    return int(file_bytes + 4 * cfg.vocab * cfg.hidden)


def cost_params(weight_format: str, context: int, prompt_tokens: int = 128, **overrides) -> CostParams:
    """The cost model's knobs for a real group: calibrated constants unless overridden (pass
    weights=weight_profile_of(source) to count the model's real bytes)."""
    knobs = dict(CALIBRATED) | overrides
    return CostParams(weight_format=weight_format, context=context, prompt_tokens=min(prompt_tokens, context),
                      kv_position=min(context, 512), **knobs)


def master_link(links: Sequence[LinkProfile]) -> LinkProfile:
    """The master's own uplink: at least as fast as the fastest path measured through it."""
    if not links:
        return LinkProfile(rtt_s=0.0, bandwidth_bytes_s=1e12)
    return LinkProfile(rtt_s=min(l.rtt_s for l in links), bandwidth_bytes_s=max(l.bandwidth_bytes_s for l in links))


def plan_real_group(cfg: ModelConfig, master: DeviceProfile, master_budget: int | None,
                    candidates: Sequence[Candidate], params: CostParams, *, wire_dtype: str | None = None,
                    leave_out: bool = True, ratios: Sequence[float] | None = None) -> RealPlan:
    """Validate joiners' profiles, plan the group (master = rank 0), and say who sits out and why.

    With ratios given (`--ratios`), only predicts that split. Raises BudgetError (from the planner)
    when no group fits, naming the shortfall and the fix.
    """
    refused: list[tuple[int, str]] = []
    offered: list[tuple[int, PlanDevice]] = []
    names = {master.name}
    for i, c in enumerate(candidates):
        try:
            profile = DeviceProfile.from_dict(c.profile)
        except ProtocolError as exc:
            refused.append((i, f"its device profile is invalid ({exc}); run `tpi devices profile` on it and join again"))
            continue
        why = backend_refusal(profile.backend, cfg.arch)
        if why:
            refused.append((i, why.replace("use --backend", "join with --backend")))
            continue
        name = c.name if c.name not in names else f"{c.name}#{i + 1}"
        names.add(name)
        profile = DeviceProfile(**(profile.to_dict() | {"name": name[:128]}))
        offered.append((i, PlanDevice(profile, c.link or ASSUMED_LINK, keep=c.keep or not leave_out)))
    links = [d.link for _, d in offered]
    devices = [PlanDevice(master, master_link(links), master_budget, keep=True)] + [d for _, d in offered]
    if ratios is not None:
        if refused:
            raise GroupError(f"--ratios needs every device, but {candidates[refused[0][0]].name} was refused: "
                             f"{refused[0][1]}")
        plan = plan_with_ratios(cfg, devices, tuple(ratios), params, wire_dtype=wire_dtype or "f32")
    else:
        plan = plan_group(cfg, devices, params, wire_dtype=wire_dtype)
    by_device = {id(d): i for i, d in offered}
    ranks = tuple(by_device[id(d)] for d in plan.devices[1:])
    why = dict(plan.excluded)
    for i, d in offered:
        if i not in ranks:
            refused.append((i, f"the planner left this device out: {why.get(d.name, 'not needed')}"))
    return RealPlan(plan=plan, ranks=ranks, refused=tuple(sorted(refused)))


def device_status(plan: GroupPlan, rank: int, link: LinkProfile | None) -> dict[str, Any]:
    """Share, predicted memory and link figures of one rank, as plain JSON for Group.status()."""
    r = plan.prediction.ranks[rank]
    shard = plan.shards[rank]
    out = {
        "ratio": round(plan.ratios[rank], 4),
        "q_heads": [shard.q_heads.start, shard.q_heads.stop], "intermediate_cols": len(shard.inter),
        "vocab_rows": len(shard.vocab),
        "budget_bytes": r.budget_bytes, "predicted_peak_bytes": r.peak_memory_bytes,
        "pinned_bytes": r.pinned_bytes, "streamed_bytes_per_token": r.streamed_bytes,
        "predicted_compute_ms": round(r.compute_s * 1e3, 3),
    }
    if link is not None:
        out["link"] = {"rtt_ms": round(link.rtt_s * 1e3, 3), "mbit_s": round(link.bandwidth_bytes_s * 8 / 1e6, 1)}
    return out


def plan_summary(plan: GroupPlan) -> dict[str, Any]:
    """Group-level prediction for Group.status()."""
    p = plan.prediction
    return {"weight_format": plan.weight_format, "granularity": plan.granularity, "wire_dtype": plan.wire_dtype,
            "wire_reason": plan.wire_reason,
            "predicted_token_ms_by_wire": {w: round(q.token_latency_s * 1e3, 3) for w, q in plan.wire_options},
            "predicted_token_ms": round(p.token_latency_s * 1e3, 3), "predicted_ttft_s": round(p.ttft_s, 4),
            "bound_by": p.bottleneck, "left_out": [list(x) for x in plan.excluded]}
