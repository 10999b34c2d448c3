"""Predicted TTFT, token latency and peak memory of a sharded group; star vs ring allreduce.

Pure functions over frozen dataclasses. Every number here is a model prediction built from
device profiles and link measurements, not a measurement.

Token latency (decode, one token):
  comm   = broadcast(hidden) + 2 * n_layers * allreduce(hidden) + gather(logit slices)
  rank_i = max(compute_i + comm, stream_i)   # the prefetcher overlaps disk with compute and comm
  token  = max_i rank_i
  compute_i = weight flops / measured GFLOP/s + attention over the KV cache / memory bandwidth
              + a fixed per-layer overhead (Python and op dispatch; DESIGN §8 measured ~0.15 ms)
  stream_i  = bytes the window plan streams per token / disk read speed
Star allreduce of B bytes over N ranks: max worker RTT (two one-way hops; one for two ranks on
the f32 wire, which swap partials) + the master's link
carrying 2(N-1) messages of B bytes (N-1 each way at once when `master_full_duplex`; the default
is the half-duplex, shared-medium case of Wi-Fi), or a slower worker's own 2 messages, plus a
per-message software overhead. B is hidden x the wire dtype's bytes per value (f32 4, bf16 2,
int8 1.0625); a narrower wire adds its conversions (`wire_convert_s`) to every allreduce.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

from tpi.model.blocks import GLOBALS, attn_key, mlp_key
from tpi.model.config import PREFILL_CHUNK, ModelConfig
from tpi.devices.experts import active_experts
from tpi.devices.profile import DeviceProfile
from tpi.devices.slicing import RankShard
from tpi.scheduler.budget import activation_bytes, kv_cache_bytes
from tpi.scheduler.window import WindowPlan, plan_window
from tpi.transport.wire import WIRE_BYTES_PER_VALUE as WIRE_BYTES

# Bytes per weight when a model's own types are not known: q4g32 = 4-bit nibble + bf16 scale
# and zero per 32 weights.
WEIGHT_BYTES = {"int4": 0.5 + 4 / 32, "bf16": 2.0}
# One conversion of n values between f32 and a wire dtype (numpy, tpi.transport.wire) costs
# fixed + n * per_value seconds. Calibrated in place, not in a loop: bench/allreduce.py's loopback
# rows at N=2 (load ~1) put a bf16 allreduce 65-95 us and an int8 one 180-240 us above the f32 one
# at hidden 576-4096, for 4 conversions each; a hot numpy loop takes 2-4x less (bf16 to+from
# 12-20 us, int8 30-60 us), as every call on the star's path does. f32 travels as it is.
WIRE_CONVERT_S = {"f32": (0.0, 0.0), "bf16": (18e-6, 2e-9), "int8": (45e-6, 4e-9)}
GB = 1e9
MATRICES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "lm_head")
Q8_0_BYTES = 34 / 32  # a column shard re-quantized because its boundary splits a block


@dataclass(frozen=True)
class WeightProfile:
    """Each matrix's real bytes per weight (by GGML type, mean over layers) and the block along K of
    the two column-split matrices (wo, w_down; max over layers): what shards of this model weigh."""

    bytes_per_weight: tuple[tuple[str, float], ...]  # (name in MATRICES, bytes per weight)
    wo_block: int = 32
    down_block: int = 32
    types: str = ""  # e.g. "Q4_K 71%, Q6_K 26%, F32 3%" (by bytes), for the plan's title

    @classmethod
    def uniform(cls, bytes_per_weight: float, types: str = "") -> "WeightProfile":
        return cls(tuple((m, bytes_per_weight) for m in MATRICES), types=types)

    def __getitem__(self, matrix: str) -> float:
        return dict(self.bytes_per_weight)[matrix]

    def for_shard(self, shard: RankShard) -> "WeightProfile":
        """This rank's bytes: a column shard that splits its matrix's blocks is held as Q8_0 (tpi.master.shard)."""
        def off_block(cols: range, block: int) -> bool:
            return bool(cols.start % block or cols.stop % block)

        redone = {"wo": off_block(shard.wo_cols, self.wo_block), "w_down": off_block(shard.inter, self.down_block)}
        if not any(redone.values()):
            return self
        return replace(self, bytes_per_weight=tuple((m, Q8_0_BYTES if redone.get(m) else b)
                                                    for m, b in self.bytes_per_weight))


@dataclass(frozen=True)
class LinkProfile:
    """A device's network link as seen from the master (for the master: its own uplink)."""

    rtt_s: float
    bandwidth_bytes_s: float  # each direction

    @classmethod
    def from_ms_mbit(cls, rtt_ms: float, mbit_s: float) -> "LinkProfile":
        return cls(rtt_s=rtt_ms / 1e3, bandwidth_bytes_s=mbit_s * 1e6 / 8)


@dataclass(frozen=True)
class CostParams:
    """Knobs of a prediction: formats, lengths and the fixed costs the model cannot measure."""

    weight_format: str = "int4"  # "int4" | "bf16"
    wire_dtype: str = "f32"  # "f32" | "bf16"
    context: int = 2048  # KV cache preallocated per sequence, tokens
    slots: int = 1  # sequences served at once, each with its own KV cache (tpi serve --parallel)
    prompt_tokens: int = 128  # prompt length for TTFT
    kv_position: int = 512  # position at which token latency is predicted
    kv_bytes_per_elem: int = 4  # fp32 KV cache (tpi.model.layers_torch: bf16 attention is 3-6x slower on AVX2)
    logit_bytes_per_elem: int = 2  # ranks return bf16 logit slices
    layer_overhead_s: float = 150e-6  # per layer per token, all ops of the layer
    message_overhead_s: float = 30e-6  # software cost per message through the master
    runtime_overhead_bytes: int = 400 << 20  # interpreter, torch, buffers (the runtime measures it)
    window_blocks: int = 2  # streamed blocks resident: one computing, one loading
    master_full_duplex: bool = False  # wired switch: master sends and receives at once (Wi-Fi: no)
    master_load_bytes: int = 0  # rank 0's transient while cutting shards (model file pages, unpack buffers)
    weights: WeightProfile | None = None  # the model's own bytes per weight; None: weight_format's, uniform
    experts: str | None = None  # MoE expert placement "split" / "whole" (--experts); None: the cost model's
    expert_streaming: bool = False  # MoE experts may stream from disk (a memory budget): placed whole

    def __post_init__(self) -> None:
        assert self.weight_format in WEIGHT_BYTES, f"weight_format must be one of {tuple(WEIGHT_BYTES)}"
        assert self.wire_dtype in WIRE_BYTES, f"wire_dtype must be one of {tuple(WIRE_BYTES)}"
        assert self.context >= 1 and self.slots >= 1 and self.prompt_tokens >= 1 and 0 <= self.kv_position <= self.context


@dataclass(frozen=True)
class RankLoad:
    """What one rank's shard weighs: block sizes, flops per token, KV cache and activations."""

    rank: int
    attn_block_bytes: int  # one layer's q/k/v/o slice
    mlp_block_bytes: int  # one layer's gate/up/down slice
    head_bytes: int  # lm_head vocab slice
    weight_params: int  # all weights this rank multiplies per token
    kv_cache_bytes: int
    activation_bytes: int
    n_q_heads: int
    n_kv_heads: int
    # MoE: of mlp_block_bytes, the experts this rank holds, and the bytes of them one token reads
    # (its chosen experts here; the busiest rank's expected share for whole experts). 0 when dense.
    expert_bytes: int = 0
    active_expert_bytes: int = 0

    @property
    def mlp_active_bytes(self) -> int:
        """Bytes of one layer's MLP block a decode token reads on this rank."""
        return self.mlp_block_bytes - self.expert_bytes + self.active_expert_bytes

    def weight_bytes(self, n_layers: int) -> int:
        """All of this rank's weight bytes (every layer plus the lm_head slice)."""
        return n_layers * (self.attn_block_bytes + self.mlp_block_bytes) + self.head_bytes


def weight_profile(params: CostParams) -> WeightProfile:
    """The model's bytes per weight: its own types when known, else uniform at weight_format."""
    return params.weights or WeightProfile.uniform(WEIGHT_BYTES[params.weight_format])


def rank_load(cfg: ModelConfig, shard: RankShard, params: CostParams) -> RankLoad:
    """Sizes of one rank's blocks for the model and its weight types."""
    h, hd, L = cfg.hidden, cfg.head_dim, cfg.n_layers
    q_rows, kv_rows, inter = len(shard.q_rows), len(shard.kv_rows), len(shard.inter)
    attn_params = (q_rows + 2 * kv_rows) * h + h * q_rows
    mlp_params = 3 * inter * h
    head_params = len(shard.vocab) * h
    wb = weight_profile(params).for_shard(shard)
    attn_bytes = h * (q_rows * (wb["wq"] + wb["wo"]) + kv_rows * (wb["wk"] + wb["wv"]))
    mlp_bytes = h * inter * (wb["w_gate"] + wb["w_up"] + wb["w_down"])
    experts = active = 0
    if cfg.is_moe:  # the router (F32, whole on every rank) and this rank's experts x columns
        per_expert = h * len(shard.expert_ff) * (wb["w_gate"] + wb["w_up"] + wb["w_down"])
        chosen = active_experts(cfg, shard)
        experts, active = int(per_expert * len(shard.experts)), int(per_expert * chosen)
        mlp_bytes = 4 * h * cfg.n_experts + experts
        inter = round(chosen * len(shard.expert_ff))  # columns a token multiplies (activations, flops)
        mlp_params = 3 * inter * h + h * cfg.n_experts
    kv = kv_cache_bytes(cfg, shard.n_kv_heads, params.context, params.kv_bytes_per_elem) * params.slots
    # What the rank's own window plan budgets (tpi.scheduler.budget): a prefill pass of the prompt.
    act = activation_bytes(cfg, shard, params.context, chunk=min(params.prompt_tokens, PREFILL_CHUNK))
    return RankLoad(
        rank=shard.rank, attn_block_bytes=int(attn_bytes), mlp_block_bytes=int(mlp_bytes),
        head_bytes=int(head_params * wb["lm_head"]), weight_params=L * (attn_params + mlp_params) + head_params,
        kv_cache_bytes=kv, activation_bytes=act, n_q_heads=shard.n_q_heads, n_kv_heads=shard.n_kv_heads,
        expert_bytes=experts, active_expert_bytes=active,
    )


def block_sizes(cfg: ModelConfig, load: RankLoad) -> list[tuple[str, int]]:
    """The rank's blocks in execution order, as the window planner wants them."""
    blocks = []
    for i in range(cfg.n_layers):
        blocks += [(attn_key(i), load.attn_block_bytes), (mlp_key(i), load.mlp_block_bytes)]
    blocks.append((GLOBALS, load.head_bytes))
    return blocks


def runtime_bytes(profile: DeviceProfile, params: CostParams) -> int:
    """The device's measured runtime memory, or the assumed one when its profile has none."""
    return profile.runtime_bytes or params.runtime_overhead_bytes


def window_for(cfg: ModelConfig, load: RankLoad, budget_bytes: int, params: CostParams) -> WindowPlan:
    """The scheduler's pinned/streamed plan for this rank; BudgetError when even streaming cannot fit."""
    return plan_window(
        block_sizes(cfg, load), budget_bytes, kv_cache_bytes=load.kv_cache_bytes,
        activation_bytes=load.activation_bytes, runtime_overhead_bytes=params.runtime_overhead_bytes,
        preferred_window=params.window_blocks,
    )


@dataclass(frozen=True)
class StarTerms:
    """One star allreduce split into its terms (seconds); their sum is the prediction."""

    latency_s: float  # the slowest worker's round trip
    bytes_s: float  # the busiest link carrying the messages' bytes
    overhead_s: float  # per-message software cost through the master

    @property
    def total_s(self) -> float:
        return self.latency_s + self.bytes_s + self.overhead_s

    @property
    def bandwidth_bound(self) -> bool:
        """The bytes cost more than the round trip and the software around it."""
        return self.bytes_s > self.latency_s + self.overhead_s


def star_terms(nbytes: float, links: Sequence[LinkProfile], params: CostParams) -> StarTerms:
    """The terms of one star allreduce of nbytes per rank; links[0] is the master's own uplink."""
    n = len(links)
    if n <= 1:
        return StarTerms(0.0, 0.0, 0.0)
    workers = links[1:]
    latency = max(l.rtt_s for l in workers)  # worker -> master, master -> worker
    messages = (n - 1) if params.master_full_duplex else 2 * (n - 1)
    master_bytes = messages * nbytes / links[0].bandwidth_bytes_s
    worker_bytes = max(2 * nbytes / l.bandwidth_bytes_s for l in workers)
    return StarTerms(latency, max(master_bytes, worker_bytes), 2 * (n - 1) * params.message_overhead_s)


def allreduce_star_s(nbytes: float, links: Sequence[LinkProfile], params: CostParams) -> float:
    """One star allreduce of nbytes per rank on the network (conversions excluded)."""
    return star_terms(nbytes, links, params).total_s


def wire_convert_s(values: int, n_ranks: int, wire_dtype: str) -> float:
    """Conversions on one allreduce's critical path: a worker's partial, the master's N-1 partials
    and its sum, the worker's sum (N + 2 of them); 0 for f32 and for one device."""
    if n_ranks <= 1:
        return 0.0
    fixed, per_value = WIRE_CONVERT_S[wire_dtype]
    return (n_ranks + 2) * (fixed + values * per_value)


def allreduce_ring_s(nbytes: int, links: Sequence[LinkProfile], params: CostParams) -> float:
    """One ring allreduce (reduce-scatter + all-gather): 2(N-1) sequential steps of nbytes/N."""
    n = len(links)
    if n <= 1:
        return 0.0
    step_latency = max(l.rtt_s for l in links[1:]) / 2 + params.message_overhead_s
    step_bytes = nbytes / n / min(l.bandwidth_bytes_s for l in links)
    return 2 * (n - 1) * (step_latency + step_bytes)


@dataclass(frozen=True)
class AllreduceComparison:
    n_ranks: int
    nbytes: int
    star_s: float
    ring_s: float

    @property
    def faster(self) -> str:
        return "star" if self.star_s <= self.ring_s else "ring"


def compare_allreduce(nbytes: int, links: Sequence[LinkProfile], params: CostParams = CostParams()) -> AllreduceComparison:
    """Star vs ring for one allreduce of nbytes on these links."""
    return AllreduceComparison(len(links), nbytes, allreduce_star_s(nbytes, links, params),
                               allreduce_ring_s(nbytes, links, params))


@dataclass(frozen=True)
class RankPrediction:
    rank: int
    name: str
    compute_s: float  # per token, excluding communication
    stream_s: float  # per token disk reads for streamed blocks
    prefill_s: float  # prompt compute, excluding communication
    streamed_bytes: int
    pinned_bytes: int
    peak_memory_bytes: int
    budget_bytes: int
    window: WindowPlan


@dataclass(frozen=True)
class Prediction:
    """Predicted group performance; all times in seconds, memory in bytes."""

    token_latency_s: float
    ttft_s: float
    comm_per_token_s: float
    allreduce_s: float  # one decode allreduce
    ranks: tuple[RankPrediction, ...]
    params: CostParams

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / self.token_latency_s

    @property
    def bottleneck(self) -> str:
        """Which term bounds the token latency: 'compute', 'disk' or 'network'."""
        slowest = max(self.ranks, key=lambda r: max(r.compute_s + self.comm_per_token_s, r.stream_s))
        if slowest.stream_s > slowest.compute_s + self.comm_per_token_s:
            return f"disk ({slowest.name})"
        return "network" if self.comm_per_token_s > slowest.compute_s else f"compute ({slowest.name})"


def step_comm_s(cfg: ModelConfig, shards: Sequence[RankShard], links: Sequence[LinkProfile],
                 tokens: int, params: CostParams, logit_rows: int = 1) -> tuple[float, float]:
    """(communication seconds for one step of `tokens` tokens returning logit_rows rows of logits,
    one allreduce of that step)."""
    n = len(links)
    if n <= 1:
        return 0.0, 0.0
    values = tokens * cfg.hidden
    master_bw = links[0].bandwidth_bytes_s
    max_half_rtt = max(l.rtt_s for l in links[1:]) / 2
    # the step's hidden states travel in f32 whatever the wire (once per step, not per layer)
    broadcast = max_half_rtt + (n - 1) * (4 * values / master_bw + params.message_overhead_s)
    one = (allreduce_star_s(values * WIRE_BYTES[params.wire_dtype], links, params)
           + wire_convert_s(values, n, params.wire_dtype))
    if n == 2 and params.wire_dtype == "f32":  # two ranks swap partials: one hop, not a round trip
        one -= links[1].rtt_s / 2               # (tpi.transport.allreduce.exchange)
    logit_bytes = logit_rows * sum(len(s.vocab) for s in shards[1:]) * params.logit_bytes_per_elem
    gather = max_half_rtt + logit_bytes / master_bw + (n - 1) * params.message_overhead_s
    return broadcast + 2 * cfg.n_layers * one + gather, one


def matmul_gflops(profile: DeviceProfile, weight_format: str) -> float:
    """The one-token matmul rate this device sustains for this weight format (its CPU share included)."""
    return (profile.int4_gflops if weight_format == "int4" else profile.bf16_gflops) * profile.cpu_share


def predict(cfg: ModelConfig, shards: Sequence[RankShard], profiles: Sequence[DeviceProfile],
            links: Sequence[LinkProfile], budgets: Sequence[int], params: CostParams = CostParams(),
            window_cache: dict | None = None) -> Prediction:
    """Predict a group's TTFT, token latency and per-device memory; rank 0 is the master.

    window_cache, when given, memoises window plans across calls (a planner scores many groups).
    """
    assert len(shards) == len(profiles) == len(links) == len(budgets), "one shard, profile, link, budget per rank"
    comm_tok, one_ar = step_comm_s(cfg, shards, links, 1, params)
    comm_prefill, _ = step_comm_s(cfg, shards, links, params.prompt_tokens, params)
    ranks = []
    for shard, prof, budget in zip(shards, profiles, budgets):
        load = rank_load(cfg, shard, params)
        mem_params = replace(params, wire_dtype="f32", runtime_overhead_bytes=runtime_bytes(prof, params))
        key = (cfg, load, budget, mem_params)  # the wire does not change memory
        plan = window_cache.get(key) if window_cache is not None else None
        if plan is None:
            plan = window_for(cfg, load, budget, mem_params)
            if window_cache is not None:
                window_cache[key] = plan
        flops = 2.0 * load.weight_params
        # Decode attention reads the KV cache up to kv_position: bandwidth-bound.
        kv_read = 2 * cfg.n_layers * len(shard.kv_rows) * params.kv_position * params.kv_bytes_per_elem
        overhead = cfg.n_layers * params.layer_overhead_s / prof.cpu_share  # other processes slow it too
        compute = flops / (matmul_gflops(prof, params.weight_format) * GB) + kv_read / (prof.memory_gbs * GB) + overhead
        p = params.prompt_tokens
        attn_flops = 4.0 * cfg.n_layers * shard.n_q_heads * cfg.head_dim * p * p / 2  # causal half
        prefill = (flops * p + attn_flops) / (prof.prefill_gflops * prof.cpu_share * GB) + overhead
        # A streamed MoE block reads its router and the chosen experts' pages, not every expert
        streamed_mlp = sum(1 for i in range(cfg.n_layers) if mlp_key(i) in plan.streamed) if cfg.is_moe else 0
        read = plan.streamed_bytes_per_token - streamed_mlp * (load.mlp_block_bytes - load.mlp_active_bytes)
        stream = read / (prof.disk_mb_s * 1e6)
        b = plan.breakdown
        ranks.append(RankPrediction(
            rank=shard.rank, name=prof.name, compute_s=compute, stream_s=stream, prefill_s=prefill,
            streamed_bytes=read, pinned_bytes=b.pinned,
            peak_memory_bytes=b.used + (params.master_load_bytes if shard.rank == 0 else 0),
            budget_bytes=budget, window=plan,
        ))
    token = max(max(r.compute_s + comm_tok, r.stream_s) for r in ranks)
    # Prefill streams every streamed block once, overlapped with the prompt's compute.
    ttft = max(max(r.prefill_s + comm_prefill, r.stream_s) for r in ranks)
    return Prediction(token_latency_s=token, ttft_s=ttft, comm_per_token_s=comm_tok, allreduce_s=one_ar,
                      ranks=tuple(ranks), params=params)
