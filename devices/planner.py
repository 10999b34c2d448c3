"""Plan a group: split ratios by speed and memory, window plans, wire dtype, and who sits out.

Pure functions. The planner balances a continuous model of each device's per-token time
(`device_time_s`) to get ratios, then scores the rounded shards with the full cost model
(`tpi.devices.costmodel.predict`, which calls the scheduler's `plan_window` per rank).
Rules:
- ratios: the split that equalises max(compute, disk streaming) over devices; a device
  streams only when giving its excess to others would be slower than reading it from disk.
- objective: decode time per token (what a user waits for per word), plain or, when the plan
  assumes speculative decoding (`SpeculationPlan`), the speculative step's time per token kept.
  TTFT only breaks a tie: it never buys a slower decode.
- wire dtype: bf16 when it predicts at least 3% lower decode time than f32 (the link's bytes
  matter), or no higher decode time and >= 3% lower TTFT; else f32, which sums exactly what the
  ranks computed. int8 (blocks of 32 int8 codes, a quarter of f32's bytes) is opt-in
  (AUTO_INT8): where an f32 allreduce is bandwidth-bound (its bytes cost more than its round
  trip and software) and int8 predicts >= 3% less still, the plan says so, why it is opt-in and
  how to opt in. The plan keeps every wire's prediction and says why it chose one.
- leave-out: workers are dropped greedily while dropping one predicts >= 1% lower decode time
  (the master always stays: it holds the model file and the embedding; so do `keep` devices).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

from tpi.model.config import ModelConfig
from tpi.scheduler.budget import kv_cache_bytes
from tpi.devices.costmodel import (
    GB, WIRE_BYTES, CostParams, LinkProfile, Prediction, matmul_gflops, predict, runtime_bytes,
    star_terms, weight_profile,
)
from tpi.devices.profile import DeviceProfile
from tpi.devices.shapes import parameter_count
from tpi.devices.slicing import RankShard, head_unit, plan_cuts
from tpi.devices.speculation_cost import SpeculationPlan
from tpi.errors import BudgetError, ShapeError

WIRE_WIN = 0.97  # a narrower wire only if it predicts >= 3% lower latency (or TTFT) than the current choice
QK = 32  # the int8 wire quantizes blocks of 32 values along hidden
# The planner suggests int8 but does not choose it: issue 18's bar (SmolLM2 logits correlation
# >= 0.999 against the f32 wire, same greedy tokens) holds on the torch backend (0.9994-0.9998)
# but not on ggml's (0.9985-0.9994, tokens part after 4-22 of 32: ggml's 8-bit activations
# amplify any change to the residual; bf16 parts after 5 there too). tests/test_wire_int8_group.py.
AUTO_INT8 = False
INT8_OPT_IN = ("int8 stays opt-in: its sums are lossy, and on the ggml backend greedy tokens part from the "
               "f32 wire's after 4-22 tokens on some prompts (docs/benchmarks.md, 'The int8 wire')")
LEAVE_OUT_WIN = 0.99  # drop a device only if the group without it predicts >= 1% lower latency
PLAIN_SLACK = 1.10  # a group chosen for speculation may decode plainly at most 10% slower than the plain choice


@dataclass(frozen=True)
class PlanDevice:
    """A device offered to the group: its profile, its link to the master, its memory budget."""

    profile: DeviceProfile
    link: LinkProfile
    budget_bytes: int | None = None  # None: the profile's free memory
    keep: bool = False  # never leave it out (the user asked for it explicitly)

    @property
    def name(self) -> str:
        return self.profile.name

    @property
    def budget(self) -> int:
        return self.profile.free_memory_bytes if self.budget_bytes is None else self.budget_bytes


@dataclass(frozen=True)
class GroupPlan:
    """The chosen group: rank order (rank 0 = master), shards, wire dtype and its prediction."""

    config: ModelConfig
    devices: tuple[PlanDevice, ...]
    ratios: tuple[float, ...]
    shards: tuple[RankShard, ...]
    wire_dtype: str
    weight_format: str
    prediction: Prediction
    excluded: tuple[tuple[str, str], ...]  # (device name, why it sits out)
    wo_align: int = 32  # wo / w_down column shards start and stop on multiples of these
    down_align: int = 32
    requantized: tuple[str, ...] = ()  # column-split matrices re-quantized to Q8_0 at the cut
    wire_options: tuple[tuple[str, Prediction], ...] = ()  # every wire considered, with its prediction
    wire_reason: str = ""  # why wire_dtype, for the plan report
    experts_placement: str = ""  # MoE: "split" / "whole" (tpi.devices.experts)
    experts_reason: str = ""  # why that placement, for the plan report
    speculation: SpeculationPlan | None = None  # what the group was chosen for; None: plain decoding
    plain_guard: str = ""  # why the plain choice's group was kept though speculation was assumed (PLAIN_SLACK)

    @property
    def decode_s(self) -> float:
        """The planner's objective: predicted seconds per decoded token (speculative when assumed)."""
        return self.speculation.decode_s(self) if self.speculation else self.prediction.token_latency_s

    @property
    def granularity(self) -> str:
        """How the column shards are cut, for the plan's reader."""
        text = f"column shards cut on {self.wo_align} (wo) and {self.down_align} (w_down) elements"
        if self.requantized:
            text += (f"; {' and '.join(self.requantized)} re-quantized to Q8_0 at the cut: their blocks "
                     f"cannot be split {len(self.devices)} ways")
        return text

    @property
    def model(self) -> str:
        return self.config.name

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.devices)

    @property
    def windows(self):
        return tuple(r.window for r in self.prediction.ranks)


def _layer_bytes(cfg: ModelConfig, params: CostParams) -> float:
    """Bytes of all per-layer matrices plus lm_head in the model's types (embedding excluded; tied
    models still multiply by the sliced embedding)."""
    w, h = weight_profile(params), cfg.hidden
    mlp_cols = cfg.n_experts * cfg.expert_ff if cfg.is_moe else cfg.intermediate  # every expert is held
    layer = h * (cfg.q_dim * (w["wq"] + w["wo"]) + cfg.kv_dim * (w["wk"] + w["wv"])
                 + mlp_cols * (w["w_gate"] + w["w_up"] + w["w_down"]) + 4 * cfg.n_experts)  # + F32 router
    return cfg.n_layers * layer + cfg.vocab * h * w["lm_head"]


def _kv_bytes(cfg: ModelConfig, ratio: float, params: CostParams) -> float:
    """KV cache for a share of the heads; at least one KV head (GQA heads are replicated)."""
    full = kv_cache_bytes(cfg, cfg.n_kv_heads, params.context, params.kv_bytes_per_elem) * params.slots
    return max(ratio * full, full / cfg.n_kv_heads)


def device_time_s(cfg: ModelConfig, dev: PlanDevice, ratio: float, params: CostParams) -> float:
    """Continuous per-token time of a device holding `ratio` of the model: max(compute, disk)."""
    weights = ratio * _layer_bytes(cfg, params)
    flops = 2.0 * ratio * parameter_count(cfg, active=True)  # a MoE token multiplies its k experts only
    compute = flops / (matmul_gflops(dev.profile, params.weight_format) * GB)
    fixed = runtime_bytes(dev.profile, params) + _kv_bytes(cfg, ratio, params)
    window = params.window_blocks * weights / (2 * cfg.n_layers)  # ~ blocks resident while streaming
    room = dev.budget - fixed - window
    if room < 0:
        return float("inf")
    excess = max(0.0, weights - room)
    return max(compute, excess / (dev.profile.disk_mb_s * 1e6))


def _largest_share(alpha: float, kv_full: float, kv_min: float, beta: float) -> float:
    """Largest r >= 0 with alpha*r + max(kv_full*r, kv_min) <= beta (0 when none fits)."""
    kink = kv_min / kv_full
    if alpha * kink + kv_min <= beta:
        return beta / (alpha + kv_full)
    return max(0.0, (beta - kv_min) / alpha) if alpha > 0 else 0.0


def _ratio_within(cfg: ModelConfig, dev: PlanDevice, t: float, params: CostParams,
                  allow_streaming: bool = True) -> float:
    """Largest ratio in [0, 1] whose `device_time_s` stays within t; closed form of its three limits."""
    weights = _layer_bytes(cfg, params)
    kv_full = _kv_bytes(cfg, 1.0, params)
    kv_min = kv_full / cfg.n_kv_heads
    free = dev.budget - runtime_bytes(dev.profile, params)
    by_compute = t / (2.0 * parameter_count(cfg, active=True) / (matmul_gflops(dev.profile, params.weight_format) * GB))
    if not allow_streaming:  # everything pinned: weights + KV within the budget
        return min(1.0, by_compute, _largest_share(weights, kv_full, kv_min, free))
    window = params.window_blocks / (2 * cfg.n_layers)  # window bytes per weight byte
    by_room = _largest_share(window * weights, kv_full, kv_min, free)
    by_disk = _largest_share((1 + window) * weights, kv_full, kv_min, free + t * dev.profile.disk_mb_s * 1e6)
    return min(1.0, by_compute, by_room, by_disk)


def balance_ratios(cfg: ModelConfig, devices: Sequence[PlanDevice], params: CostParams,
                   allow_streaming: bool = True) -> tuple[float, ...]:
    """Ratios (summing to 1) that equalise the devices' predicted per-token time."""
    def total(t: float) -> float:
        return sum(_ratio_within(cfg, d, t, params, allow_streaming) for d in devices)

    hi = 1e-3
    while total(hi) < 1.0:
        hi *= 4
        if hi > 1e7:  # not even a week per token fits: memory, not speed, is the limit
            raise BudgetError(_shortfall_message(cfg, devices, params))
    lo = 0.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if total(mid) >= 1.0 else (mid, hi)
    raw = [max(_ratio_within(cfg, d, hi, params, allow_streaming), 1e-6) for d in devices]
    return tuple(r / sum(raw) for r in raw)


def _shortfall_message(cfg: ModelConfig, devices: Sequence[PlanDevice], params: CostParams) -> str:
    """Say how much memory the group lacks to pin the whole model, and the smallest fixes."""
    need = (_layer_bytes(cfg, params) + _kv_bytes(cfg, 1.0, params)
            + sum(runtime_bytes(d.profile, params) for d in devices))
    have = sum(d.budget for d in devices)
    short = max(need - have, 0) / GB
    fixes = [f"add a device with >= {short + params.runtime_overhead_bytes / GB:.1f} GB free"]
    if params.weight_format != "int4":
        fixes.append("use int4 weights")
    fixes += [f"plan a shorter context than {params.context}", "allow streaming weights from disk"]
    return (f"{cfg.name} ({params.weight_format}) needs {need / GB:.1f} GB across the group "
            f"but the {len(devices)} devices offer {have / GB:.1f} GB: needs {short:.1f} GB more across "
            f"the group: {', or '.join(fixes)}")


def _pinned_share(cfg: ModelConfig, dev: PlanDevice, params: CostParams) -> float:
    """Largest ratio a device holds with every weight pinned (continuous model)."""
    kv_full = _kv_bytes(cfg, 1.0, params)
    free = dev.budget - runtime_bytes(dev.profile, params)
    return _largest_share(_layer_bytes(cfg, params), kv_full, kv_full / cfg.n_kv_heads, free)


def _score(cfg: ModelConfig, devices: Sequence[PlanDevice], ratios: tuple[float, ...], params: CostParams,
           wire_dtype: str | None, window_cache: dict | None,
           speculation: SpeculationPlan | None = None) -> GroupPlan:
    """Shards, wire dtype and prediction for fixed ratios (every wire is predicted, for the report)."""
    w = weight_profile(params)
    cuts = plan_cuts(cfg, ratios, w.wo_block, w.down_block, placement=params.experts,
                     streaming=params.expert_streaming)
    shards = cuts.shards
    profiles = [d.profile for d in devices]
    links = [d.link for d in devices]
    budgets = [d.budget for d in devices]
    wires = [w for w in WIRE_BYTES if w != "int8" or cfg.hidden % QK == 0] if len(devices) > 1 else ["f32"]
    if wire_dtype and wire_dtype not in wires:
        raise ShapeError(f"the {wire_dtype} wire needs a hidden size that is a multiple of {QK}; "
                         f"{cfg.name} has {cfg.hidden}: use f32 or bf16")
    preds = {w: predict(cfg, shards, profiles, links, budgets, replace(params, wire_dtype=w), window_cache)
             for w in wires}
    first = next(iter(preds))
    base = GroupPlan(config=cfg, devices=tuple(devices), ratios=ratios, shards=shards, wire_dtype=first,
                     weight_format=params.weight_format, prediction=preds[first], excluded=(),
                     wo_align=cuts.wo_align, down_align=cuts.down_align, requantized=cuts.requantized,
                     wire_options=tuple(preds.items()),
                     experts_placement=cuts.experts.placement if cuts.experts else "", experts_reason=cuts.experts_reason,
                     speculation=speculation)
    decode = {w: replace(base, wire_dtype=w, prediction=p).decode_s for w, p in preds.items()}
    if wire_dtype is None:
        wire, reason = choose_wire(cfg, links, params, preds, decode_s=decode)
    else:
        wire, reason = wire_dtype, fixed_wire_reason(cfg, links, params, wire_dtype, decode)
    if speculation and speculation.on and len(preds) > 1:
        reason += f"; ms/token here are with speculation at {speculation.acceptance:.0%} of drafts kept"
    return replace(base, wire_dtype=wire, prediction=preds[wire], wire_reason=reason)


def fixed_wire_reason(cfg: ModelConfig, links: Sequence[LinkProfile], params: CostParams, wire: str,
                      decode: dict[str, float]) -> str:
    """Why the wire the options fixed, and what the planner's own choice would predict."""
    text = f"{wire} on the wire, fixed by the options"
    if len(decode) < 2:
        return text
    terms = star_terms(cfg.hidden * WIRE_BYTES["f32"], links, params)
    bound = "bandwidth-bound" if terms.bandwidth_bound else "not bandwidth-bound"
    others = ", ".join(f"{w} {s * 1e3:.1f}" for w, s in decode.items() if w != wire)
    return (f"{text} (the master's link is {bound}: an f32 allreduce spends {terms.bytes_s * 1e3:.2f} ms on "
            f"bytes against {(terms.latency_s + terms.overhead_s) * 1e3:.2f} ms of round trip and software; "
            f"{wire} predicts {decode[wire] * 1e3:.1f} ms/token, {others})")


def choose_wire(cfg: ModelConfig, links: Sequence[LinkProfile], params: CostParams,
                preds: dict[str, Prediction], auto_int8: bool = AUTO_INT8,
                decode_s: dict[str, float] | None = None) -> tuple[str, str]:
    """(wire dtype, why) from every wire's prediction; see the module doc for the rules.
    decode_s: each wire's decode time per token, the objective (default: the plain token latency)."""
    if len(preds) == 1:
        return "f32", "f32 on the wire (one device: no allreduce)"
    decode = decode_s or {w: p.token_latency_s for w, p in preds.items()}
    ms = {w: s * 1e3 for w, s in decode.items()}

    def better(a: str, b: str) -> bool:  # decode first; TTFT only where decode is no worse
        return decode[a] < WIRE_WIN * decode[b] or (decode[a] <= decode[b]
                                                    and preds[a].ttft_s < WIRE_WIN * preds[b].ttft_s)

    wire = "bf16" if better("bf16", "f32") else "f32"
    terms = star_terms(cfg.hidden * WIRE_BYTES["f32"], links, params)
    where = (f"an f32 allreduce spends {terms.bytes_s * 1e3:.2f} ms on bytes against "
             f"{(terms.latency_s + terms.overhead_s) * 1e3:.2f} ms of round trip and software")
    if "int8" in preds and terms.bandwidth_bound and better("int8", wire):
        if auto_int8:
            return "int8", (f"int8 on the wire: the link is bandwidth-bound ({where}); predicts "
                            f"{ms['int8']:.1f} ms/token against {ms[wire]:.1f} with {wire}")
        suggest = (f"; the link is bandwidth-bound ({where}): int8 would predict {ms['int8']:.1f} ms/token, "
                   f"opt in with --wire-dtype int8 ({INT8_OPT_IN})")
    else:
        suggest = ""
    if wire == "bf16":
        ttft = "" if decode["bf16"] < WIRE_WIN * decode["f32"] else (
            f" and a TTFT of {preds['bf16'].ttft_s:.2f} s against {preds['f32'].ttft_s:.2f}")
        return "bf16", (f"bf16 on the wire: predicts {ms['bf16']:.1f} ms/token against {ms['f32']:.1f} with f32"
                        + ttft + suggest)
    why = "not bandwidth-bound: " + where if not terms.bandwidth_bound else "a narrower wire saves < 3%"
    return "f32", f"f32 on the wire (exact sums; {why})" + suggest


def _shift_away(ratios: Sequence[float], donors: Sequence[int], step: float) -> tuple[float, ...] | None:
    """Move up to `step` of share from each donor to the other devices, in proportion to their shares."""
    takers = [i for i in range(len(ratios)) if i not in donors]
    if not takers:
        return None
    out = list(ratios)
    moved = 0.0
    for i in donors:
        give = min(step, out[i] * 0.5)
        out[i] -= give
        moved += give
    base = sum(out[i] for i in takers)
    for i in takers:
        out[i] += moved * out[i] / base
    return tuple(out)


def _evaluate(cfg: ModelConfig, devices: Sequence[PlanDevice], params: CostParams, allow_streaming: bool,
              wire_dtype: str | None, window_cache: dict | None = None,
              speculation: SpeculationPlan | None = None) -> GroupPlan:
    """Ratios, shards, wire dtype and prediction for exactly these devices; BudgetError if infeasible."""
    ratios = balance_ratios(cfg, devices, params, allow_streaming)
    plan = _score(cfg, devices, ratios, params, wire_dtype, window_cache, speculation)
    # Rounding to whole heads and 32-column blocks can push a device past its budget, so that
    # it streams where the continuous split said it would not: move one head's share away.
    by_design = [r > _pinned_share(cfg, d, params) for d, r in zip(devices, ratios)]
    step = head_unit(cfg.head_dim) / cfg.n_heads
    for _ in range(2 * len(devices)):
        over = [i for i, r in enumerate(plan.prediction.ranks) if r.streamed_bytes and not by_design[i]]
        shifted = _shift_away(plan.ratios, over, step) if over else None
        if shifted is None:
            break
        candidate = _score(cfg, devices, shifted, params, wire_dtype, window_cache, speculation)
        if allow_streaming and candidate.decode_s >= plan.decode_s:
            break
        plan = candidate
    streaming = [r.name for r in plan.prediction.ranks if r.streamed_bytes]
    if streaming and not allow_streaming:
        raise BudgetError(
            f"{', '.join(streaming)} cannot hold its share of {cfg.name} without streaming, because shards "
            f"come in whole heads ({step:.1%} of attention each): give it a larger memory budget, add a "
            "device, or allow streaming weights from disk"
        )
    return plan


def plan_with_ratios(cfg: ModelConfig, devices: Sequence[PlanDevice], ratios: Sequence[float],
                     params: CostParams = CostParams(), wire_dtype: str | None = None,
                     speculation: SpeculationPlan | None = None) -> GroupPlan:
    """The prediction for a split the user fixed (`--ratios`): no balancing, nobody left out."""
    if len(ratios) != len(devices):
        raise ShapeError(f"{len(ratios)} split ratios for {len(devices)} devices; give one per device")
    total = sum(ratios)
    return _score(cfg, devices, tuple(r / total for r in ratios), params, wire_dtype, None, speculation)


def plan_group(cfg: ModelConfig, devices: Sequence[PlanDevice], params: CostParams = CostParams(),
               allow_streaming: bool = True, wire_dtype: str | None = None,
               speculation: SpeculationPlan | None = None) -> GroupPlan:
    """Choose the group (devices[0] is the master), its ratios, windows and wire dtype, for the
    decode time per token plain (speculation None or off) or speculative as `speculation` assumes.

    A group chosen for speculation serves open-ended text (where auto turns itself off) too, so it
    is kept only while its plain figure stays within PLAIN_SLACK of the group chosen for plain
    decoding; otherwise the plain choice's group is used, scored with speculation."""
    if speculation is None or not speculation.on:
        return _choose(cfg, devices, params, allow_streaming, wire_dtype, None)
    plain = _choose(cfg, devices, params, allow_streaming, wire_dtype, None)
    spec = _choose(cfg, devices, params, allow_streaming, wire_dtype, speculation)
    if spec.prediction.token_latency_s <= PLAIN_SLACK * plain.prediction.token_latency_s:
        return spec
    kept = _evaluate(cfg, list(plain.devices), params, allow_streaming, wire_dtype, {}, speculation)
    why = (f"the group best for speculation alone ({len(spec.devices)} devices) would decode open-ended text at "
           f"{spec.prediction.token_latency_s * 1e3:.1f} ms/token, more than {PLAIN_SLACK:.2f}x this one's")
    return replace(kept, excluded=plain.excluded, plain_guard=why)


def _choose(cfg: ModelConfig, devices: Sequence[PlanDevice], params: CostParams, allow_streaming: bool,
            wire_dtype: str | None, speculation: SpeculationPlan | None) -> GroupPlan:
    """Leave devices out one at a time while that lowers the objective (GroupPlan.decode_s)."""
    if not devices:
        raise BudgetError("no devices to plan for; the master itself must be one of them")
    excluded: list[tuple[str, str]] = []
    window_cache: dict = {}  # window plans repeat across the groups tried below
    max_ranks = cfg.n_heads // head_unit(cfg.head_dim)
    current = list(devices)
    if len(current) > max_ranks:
        by_speed = sorted(current[1:], key=lambda d: (not d.keep, -matmul_gflops(d.profile, params.weight_format)))
        keep = by_speed[: max_ranks - 1]
        for d in by_speed[max_ranks - 1:]:
            excluded.append((d.name, f"{cfg.name} splits into at most {max_ranks} head blocks"))
        current = [current[0]] + [d for d in current[1:] if d in keep]

    def attempt(group: Sequence[PlanDevice]) -> GroupPlan | BudgetError:
        try:
            return _evaluate(cfg, group, params, allow_streaming, wire_dtype, window_cache, speculation)
        except (BudgetError, ShapeError) as exc:
            return exc if isinstance(exc, BudgetError) else BudgetError(str(exc))

    best = attempt(current)
    while len(current) > 1:
        trials = [(d, attempt([x for x in current if x is not d])) for d in current[1:] if not d.keep]
        feasible = [(d, p) for d, p in trials if isinstance(p, GroupPlan)]
        if not feasible:
            break
        drop, plan = min(feasible, key=lambda dp: dp[1].decode_s)
        if isinstance(best, GroupPlan):
            if plan.decode_s >= LEAVE_OUT_WIN * best.decode_s:
                break
            how = " with speculation" if speculation and speculation.on else ""
            reason = (f"leaving it out predicts {plan.decode_s * 1e3:.1f} ms/token{how} instead of "
                      f"{best.decode_s * 1e3:.1f} ms/token")
        else:
            reason = f"the group is infeasible with it ({best})"
        excluded.append((drop.name, reason))
        current = [x for x in current if x is not drop]
        best = plan
    if isinstance(best, BudgetError):
        raise best
    return replace(best, excluded=tuple(excluded))
