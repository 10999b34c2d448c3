"""Streaming under a memory budget changes where weights live, never what is computed.

Reference: the all-pinned engine exactly as `tpi run` builds it without a budget (start_group
cuts the model and prepares every block in memory; no shard store involved), itself checked
against the fp32 numpy reference. Streamed engines read rank 0's shard store (written by
start_group under a budget) through open_store_weights with budgets that pin only part of the
model. Same kernels, same bytes: logits must be bit-for-bit equal (np.array_equal), not close.

Budgets here pass runtime_overhead=0 so that they are exact; the measured overhead is exercised
by test_budget_memory.py (CLI and 2-device group in fresh processes).
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tpi.model.backends import make_layers
from tpi.errors import BudgetError
from tpi.master.engine import Engine
from tpi.master import GroupOptions, start_group
from tpi.model.transformer import Transformer
from tpi.scheduler.store import ShardStore
from tpi.devices.slicing import shard_from_dict
from tpi.model.config import config_from_dict
from tpi.model.blocks import GLOBALS
from tpi.model.weights import open_store_weights, plan_memory, planned_block_sizes

CONTEXT = 64
PROMPT = "The capital of France is Paris. The capital of Italy is"
DECODE_STEPS = 6


def run_greedy(engine) -> tuple[np.ndarray, list[int], list[np.ndarray]]:
    """(prompt logits [T, vocab], greedy tokens, logits of each decode step)."""
    ids = engine.tokenizer.encode(PROMPT, add_bos=True, special=True)
    engine.reset()
    prompt_logits = engine.forward(ids, 0, all_positions=True).copy()
    tokens, steps, pos = [], [], len(ids)
    last = prompt_logits[-1]
    for _ in range(DECODE_STEPS):
        tok = int(np.argmax(last))
        tokens.append(tok)
        last = engine.forward([tok], pos)[-1].copy()
        steps.append(last)
        pos += 1
    return prompt_logits, tokens, steps


class Rank0Store:
    """Rank 0's shard store of a model as start_group writes it under a budget, plus the reference run."""

    def __init__(self, model: Path, tmp: Path, backend: str):
        opts = dict(model=str(model), context=CONTEXT, threads=1, backend=backend,
                    config_dir=tmp / "config", cache_dir=tmp / "cache")
        pinned = start_group(GroupOptions(**opts))  # no budget: the all-pinned path
        try:
            self.reference = run_greedy(pinned.engine)
            self.tokenizer = pinned.engine.tokenizer
        finally:
            pinned.close()
        start_group(GroupOptions(**opts, memory_budget=1 << 40)).close()  # writes rank 0's store
        (self.path,) = (tmp / "cache" / "master").glob("*.tpis")
        self.store = ShardStore.open(self.path)
        self.cfg = config_from_dict(self.store.meta["config"])
        self.shard = shard_from_dict(self.store.meta["shard"], self.cfg)
        self.backend = backend

    def layers(self):
        return make_layers(self.backend, self.cfg, self.shard, CONTEXT, 1)

    def budget(self, layer_bytes_pinned: str) -> int:
        """'minimum': the least feasible budget (no overhead); 'half': half the layers' bytes more.

        Blocks count at the size their kernels hold (a Q4_0 file's blocks are held as q4g32)."""
        sizes = dict(planned_block_sizes(self.store, embed_mapped=True, layers=self.layers()))
        plan = plan_memory(self.store, self.layers(), self.cfg, self.shard, CONTEXT, 1 << 40, runtime_overhead=0)
        b = plan.breakdown
        layers = [n for k, n in sizes.items() if k != GLOBALS]
        minimum = b.kv_cache + b.activations + sizes[GLOBALS] + max(layers)
        return minimum if layer_bytes_pinned == "minimum" else minimum + sum(layers) // 2

    def engine(self, budget: int):
        layers = self.layers()
        weights = open_store_weights(self.store, layers, self.cfg, self.shard, CONTEXT, budget, runtime_overhead=0)
        embed = weights.get(GLOBALS)["embed"]
        weights.release(GLOBALS)
        return Engine(self.cfg, self.tokenizer, Transformer(self.cfg, layers, weights), embed, CONTEXT), weights


@pytest.fixture(scope="module")
def rank0_store(tmp_path_factory, tiny_gguf, kquant_gguf, smollm2):
    made: dict[tuple[str, str], Rank0Store] = {}
    models = {
        "tiny_llama": lambda: tiny_gguf("tiny_llama_q4_0", n_layers=4),
        "tiny_qwen2_tied": lambda: tiny_gguf("tiny_qwen2_q4_0_tied", n_layers=3),
        "qwen2_q4_k_m": lambda: kquant_gguf("Q4_K_M", "qwen2_512"),  # Q4_K + Q6_K, some blocks unfused
        "smollm2": lambda: smollm2,
    }

    def get(name: str, backend: str = "torch") -> Rank0Store:
        if (name, backend) not in made:
            made[name, backend] = Rank0Store(models[name](), tmp_path_factory.mktemp(name), backend)
        return made[name, backend]

    yield get
    for r in made.values():
        r.store.close()


def test_all_pinned_reference_tracks_fp32_reference(rank0_store, tiny_gguf, reference_of):
    """The reference run is itself right (else equal outputs would prove little)."""
    r = rank0_store("tiny_llama")
    ids = r.tokenizer.encode(PROMPT, add_bos=True, special=True)
    ref = reference_of(tiny_gguf("tiny_llama_q4_0", n_layers=4)).logits(ids)
    ours = r.reference[0]
    assert min(np.corrcoef(ours[i], ref[i])[0, 1] for i in range(len(ids))) > 0.998


@pytest.mark.parametrize("name,backend", [("tiny_llama", "torch"), ("tiny_qwen2_tied", "torch"),
                                          ("tiny_llama", "numpy"), ("tiny_llama", "ggml"), ("tiny_qwen2_tied", "ggml"),
                                          ("qwen2_q4_k_m", "numpy"), ("qwen2_q4_k_m", "torch"), ("qwen2_q4_k_m", "ggml"),
                                          pytest.param("smollm2", "torch", marks=pytest.mark.slow)])
@pytest.mark.parametrize("pinned", ["minimum", "half"])
def test_streamed_run_is_bit_identical_to_all_pinned(rank0_store, name, backend, pinned):
    r = rank0_store(name, backend)
    budget = r.budget(pinned)
    engine, weights = r.engine(budget)
    try:
        plan = weights.plan
        shard_bytes = sum(n for _, n in r.store.block_sizes())
        assert plan.streamed and plan.breakdown.pinned + plan.breakdown.window < shard_bytes
        if pinned == "minimum":  # only the largest block fits beside globals: no overlap, nothing pinned
            assert plan.window == 1 and plan.pinned == (GLOBALS,)
        else:
            assert plan.window == 2 and len(plan.pinned) > 1
        if name == "qwen2_q4_k_m":  # blocks stream from a copy already in the kernels' formats
            assert weights.store.path.name.endswith(".kernel") and weights.store is not r.store
        got = run_greedy(engine)
    finally:
        weights.close()
    ref_logits, ref_tokens, ref_steps = r.reference
    assert got[1] == ref_tokens
    assert np.array_equal(got[0], ref_logits)
    for step, (a, b) in enumerate(zip(got[2], ref_steps)):
        assert np.array_equal(a, b), f"decode step {step} differs"


def test_stats_count_bytes_stall_and_overlap_per_interval(rank0_store):
    r = rank0_store("tiny_llama")
    engine, weights = r.engine(r.budget("half"))
    try:
        plan = weights.plan
        weights.token_stats()  # drop what loading the first window read
        run_greedy(engine)
        passes = 1 + DECODE_STEPS
        s = weights.token_stats()
        per_pass = plan.streamed_bytes_per_token
        # every pass reads every streamed block once; the loader may already hold the next window
        assert passes * per_pass - plan.breakdown.window <= s["bytes_read"] <= passes * per_pass + plan.breakdown.window
        assert abs(s["bytes_read_per_token"] - per_pass) <= plan.breakdown.window
        assert s["stall_s"] >= 0 and 0.0 <= s["overlap"] <= 1.0
        assert s["pinned_bytes"] == plan.breakdown.pinned and s["budget_bytes"] == plan.breakdown.budget
        again = weights.token_stats()  # a new interval: nothing ran since
        assert again["bytes_read"] <= plan.breakdown.window and again["bytes_read_per_token"] == 0
    finally:
        weights.close()


def test_embedding_is_a_map_view_and_costs_no_budget(rank0_store):
    r = rank0_store("tiny_llama")
    whole = dict(r.store.block_sizes())[GLOBALS]
    planned = dict(planned_block_sizes(r.store, embed_mapped=True))[GLOBALS]
    engine, weights = r.engine(r.budget("half"))
    try:
        embed = engine.embed_table
        table_bytes = sum(a.nbytes for a in embed.arrays.values())
        assert planned == whole - table_bytes and table_bytes > 0
        assert embed.fmt == "ggml:Q4_0"  # the file's own type: rows are dequantized on the host
        assert not embed.arrays["data"].flags.writeable  # a view of the store's map, not a copy
        assert GLOBALS in weights.plan.pinned
        assert weights.plan.breakdown.pinned == sum(
            n for k, n in planned_block_sizes(r.store, embed_mapped=True, layers=r.layers())
            if k in weights.plan.pinned)
    finally:
        weights.close()


class CountingStore:
    """A ShardStore that counts block loads into memory."""

    def __init__(self, store):
        self._store, self.copies = store, 0

    def load(self, key, copy=True):
        self.copies += bool(copy)
        return self._store.load(key, copy)

    def __getattr__(self, name):
        return getattr(self._store, name)


def test_impossible_budget_refused_before_loading_with_exact_minimum(rank0_store):
    r = rank0_store("tiny_llama")
    spy = CountingStore(r.store)
    with pytest.raises(BudgetError) as err:
        open_store_weights(spy, r.layers(), r.cfg, r.shard, CONTEXT, 1000, runtime_overhead=0)
    assert spy.copies == 0
    minimum = int(re.search(r"minimum feasible budget is [\d.]+ \S+ \((\d+) bytes", str(err.value)).group(1))
    assert minimum == r.budget("minimum")
    plan_memory(r.store, r.layers(), r.cfg, r.shard, CONTEXT, minimum, runtime_overhead=0)
    with pytest.raises(BudgetError):
        plan_memory(r.store, r.layers(), r.cfg, r.shard, CONTEXT, minimum - 1, runtime_overhead=0)


@pytest.mark.slow
def test_cli_refuses_impossible_budget_in_one_line(tiny_gguf, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "tpi", "run", str(tiny_gguf("tiny_llama_q4_0")), "--prompt", "hi", "-n", "2",
         "--threads", "1", "--memory-budget", "1MB", "--cache-dir", str(tmp_path / "cache"),
         "--config-dir", str(tmp_path / "config")],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert re.match(r"error: memory budget .* too small: the minimum feasible budget is [\d.]+ MiB \(\d+ bytes = "
                    r".*runtime overhead.*\); raise --memory-budget to at least", errors[0])
    assert proc.stdout == ""


@pytest.mark.parametrize("setup_above_plan", [True, False])
def test_budget_also_covers_the_setup_peak(rank0_store, setup_above_plan):
    r = rank0_store("tiny_llama")
    plan_minimum = r.budget("minimum")
    setup = plan_minimum + (1 << 20) if setup_above_plan else plan_minimum - (1 << 20)
    with pytest.raises(BudgetError) as err:
        plan_memory(r.store, r.layers(), r.cfg, r.shard, CONTEXT, 1000, runtime_overhead=0, setup_rss=setup)
    message = str(err.value)
    minimum = int(re.search(r"minimum feasible budget is [\d.]+ \S+ \((\d+) bytes", message).group(1))
    assert minimum == max(setup, plan_minimum)
    assert message.startswith(("memory budget 1.0 KiB ", "memory budget 0.0 MiB "))  # names the user's budget
    plan_memory(r.store, r.layers(), r.cfg, r.shard, CONTEXT, max(setup, plan_minimum), runtime_overhead=0,
                setup_rss=setup)
