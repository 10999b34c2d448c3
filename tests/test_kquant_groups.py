"""A group on a real Q4_K_M mix computes what one device computes, whatever its column cuts.

The model (hidden 512, 8 query / 2 KV heads, intermediate 1024) has wo in Q4_K: 2 blocks of 256
along K, so 2 devices cut wo on its blocks, while 3 or 4 devices cannot, and the ranks whose wo
columns split a block get a Q8_0 copy of them (tpi.master.shard.cut_cols). w_down (4 blocks) splits
natively in every case. Real `tpi join` workers on loopback, numpy backend on every rank (the ggml
layers are another helper's; numpy runs the same shards). Same assertions as test_group_parity.
"""
from __future__ import annotations

import pytest
from test_group_parity import assert_same_output, grouped_run, run_engine

from tpi.master import GroupOptions, start_group
from tpi.master.events import ShardsRequantized
from tpi.scheduler.store import ShardStore

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::ResourceWarning")]

CASES = [
    # (N, ratios, wo fmt on each worker rank)
    (2, (0.5, 0.5), ["ggml:Q4_K"]),
    (3, (0.5, 0.25, 0.25), ["ggml:Q8_0", "ggml:Q8_0"]),  # wo columns 256:384 and 384:512
    (4, (0.25,) * 4, ["ggml:Q8_0", "ggml:Q8_0", "ggml:Q8_0"]),  # 4 ranks > 2 KV heads: replicated
]


def options(model, tmp, **kw) -> GroupOptions:
    return GroupOptions(model=str(model), backend="numpy", worker_backend="numpy", threads=1,
                        config_dir=tmp / "config", cache_dir=tmp / "cache", join_timeout_s=180, **kw)


@pytest.fixture(scope="module")
def q4_k_m(kquant_gguf):
    return kquant_gguf("Q4_K_M", "qwen2_512")


@pytest.fixture(scope="module")
def single(q4_k_m, tmp_path_factory):
    group = start_group(options(q4_k_m, tmp_path_factory.mktemp("single")))
    try:
        return run_engine(group.engine)
    finally:
        group.close()


@pytest.mark.parametrize("world, ratios, worker_wo", CASES, ids=[f"N{c[0]}" for c in CASES])
def test_group_on_a_q4_k_m_mix_gives_single_device_tokens(world, ratios, worker_wo, q4_k_m, single, tmp_path):
    said = []
    grouped = grouped_run(options(q4_k_m, tmp_path, local_workers=world - 1, host="127.0.0.1", ratios=ratios),
                          world, single[1], on_event=said.append)
    assert_same_output(single, grouped, f"Q4_K_M N={world} ratios={ratios}")
    stores = sorted((tmp_path / "cache" / "master").glob("*.tpis"), key=lambda p: p.stat().st_mtime)
    got = []
    for path in stores:
        store = ShardStore.open(path)
        got.append((store.meta["shard"]["rank"], store.load("L0.attn", copy=False)["wo"].fmt,
                    store.load("L0.mlp", copy=False)["wdown"].fmt))
        store.close()
    assert [wo for _, wo, _ in sorted(got)] == worker_wo
    assert all(down in ("ggml:Q4_K", "ggml:Q6_K") for _, _, down in got)  # w_down always on its blocks
    requantized = [e for e in said if isinstance(e, ShardsRequantized)]
    assert bool(requantized) == (world > 2) and all("re-quantized to Q8_0" in str(e) for e in requantized)
