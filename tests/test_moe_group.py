"""Qwen3-MoE across real worker processes: a loopback group (`start_group` with `tpi join` workers, CURVE
on) computes what one device computes, with either expert placement, and says which it used and why.

The model is tests/family_models.py's qwen3moe_32x8 (32 experts, top 8) in F32: a rank's partial sums
differ from one device's only in float summation order, so the greedy tokens are one device's exactly
and the logits stay within test_group_parity's tolerance. Each worker holds its placement's experts
(whole experts: only those; split: every expert at its columns), checked on the shard stores it was sent.
"""
from __future__ import annotations

import pytest
from test_group_parity import assert_same_output, grouped_run, run_engine

from tpi.master import GroupOptions, start_group
from tpi.master.events import ExpertsPlaced
from tpi.model.blocks import mlp_key
from tpi.scheduler.store import ShardStore

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::ResourceWarning")]

CASES = [(2, (0.5, 0.5), "split"), (2, (0.5, 0.5), "whole"), (3, (0.5, 0.25, 0.25), "split"),
         (3, (0.5, 0.25, 0.25), "whole")]


def options(model, tmp, backend: str = "ggml", **kw) -> GroupOptions:
    return GroupOptions(model=str(model), backend=backend, worker_backend=backend, threads=1, context=256,
                        config_dir=tmp / "config", cache_dir=tmp / "cache", join_timeout_s=180, **kw)


@pytest.fixture(scope="module")
def moe_file(family_gguf):
    return family_gguf("qwen3moe_32x8")


@pytest.fixture(scope="module")
def single(moe_file, tmp_path_factory):
    """backend -> one device's (logits, greedy tokens)."""
    made = {}

    def get(backend: str):
        if backend not in made:
            group = start_group(options(moe_file, tmp_path_factory.mktemp("single"), backend))
            try:
                made[backend] = run_engine(group.engine)
            finally:
                group.close()
        return made[backend]

    return get


def worker_experts(cache) -> list[tuple[int, int, int]]:
    """(rank, experts held, rows of their gate tensor) of every worker's shard store."""
    out = []
    for path in (cache / "master").glob("*.tpis"):
        store = ShardStore.open(path)
        e = store.meta["shard"]["experts"]
        out.append((store.meta["shard"]["rank"], e[1] - e[0], store.load(mlp_key(0), copy=False)["wgate_exps"].shape[0]))
        store.close()
    return sorted(out)


@pytest.mark.parametrize("world, ratios, placement", CASES, ids=[f"N{c[0]}-{c[2]}" for c in CASES])
def test_a_moe_group_of_worker_processes_gives_one_devices_tokens(world, ratios, placement, moe_file, single,
                                                                    tmp_path):
    said = []
    want = single("ggml")
    got = grouped_run(options(moe_file, tmp_path, local_workers=world - 1, host="127.0.0.1", ratios=ratios,
                              experts=placement), world, want[1], on_event=said.append)
    assert_same_output(want, got, f"qwen3moe N={world} {placement}")
    assert got[1] == want[1]
    placed = [e for e in said if isinstance(e, ExpertsPlaced)]
    assert [e.placement for e in placed] == [placement] and "--experts" in placed[0].reason
    held = worker_experts(tmp_path / "cache")
    assert len(held) == world - 1
    for rank, n_experts, gate_rows in held:
        assert (n_experts == 32) == (placement == "split")
        assert gate_rows == n_experts * (256 * ratios[rank] if placement == "split" else 256)


def test_a_numpy_moe_group_with_the_cost_models_placement(moe_file, single, tmp_path):
    """numpy on every rank (the torch-free fallback); no --experts: the cost model places them and says why."""
    said = []
    want = single("numpy")
    got = grouped_run(options(moe_file, tmp_path, "numpy", local_workers=1, host="127.0.0.1", ratios=(0.5, 0.5)),
                      2, want[1], on_event=said.append)
    assert_same_output(want, got, "qwen3moe numpy N=2")
    assert got[1] == want[1]
    (placed,) = [e for e in said if isinstance(e, ExpertsPlaced)]
    assert placed.placement in ("split", "whole") and "MoE layer" in placed.reason
