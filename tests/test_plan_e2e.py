"""The planner drives a real group: uneven split by reported speed, a slow remote device refused.

One multi-process case (slow): the master (rank 0) reports twice the speed of its local worker,
so the planner gives it about 2/3 of the model; a third device joins over `tpi join` reporting
a hopeless speed and is refused with the planner's reason. The 2-device group must produce the
single-device engine's greedy tokens (tpi.master.engine.build_local_engine), and Group.status() must
carry each device's handshake profile, share and link figures.

Greedy tokens are compared where they can be: a group rounds each rank's partial sums to bf16
before the fp32 allreduce, so where the single-device top-2 margin is below twice the largest
logit difference of that row, either token is a correct answer (see test_group_parity.py).
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tpi.devices.profile import DeviceProfile
from tpi.master import EngineOptions, build_local_engine
from tpi.master import GroupOptions, start_group
from tpi.master.events import DeviceLeftOut, GroupPlanned, WaitingForDevices
from tpi.master.sampler import SamplingParams
from tpi.transport.keeper import free_port_pair

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is Paris. The capital of Italy is"
TOKENS = 8


def profile(name: str, int4_gflops: float) -> dict:
    return DeviceProfile(name=name, os="Linux x86_64", cores=2, total_memory_bytes=8 << 30,
                         free_memory_bytes=6 << 30, backend="torch", int4_gflops=int4_gflops,
                         bf16_gflops=int4_gflops / 2, prefill_gflops=int4_gflops, memory_gbs=10.0,
                         disk_mb_s=500.0, measured_at=1.7e9, runtime_bytes=400 << 20).to_dict()


def greedy(engine, forced: list[int] | None = None) -> tuple[np.ndarray, list[int]]:
    """(logits over prompt + forced tokens, free-running greedy tokens)."""
    ids = engine.tokenizer.encode(PROMPT, add_bos=True, special=True)
    engine.reset()
    tokens = engine.generate(ids, SamplingParams(temperature=0.0), TOKENS, ignore_eos=True).tokens
    engine.reset()
    seq = ids + list(forced if forced is not None else tokens)[:-1]
    return engine.forward(seq, 0, all_positions=True).copy(), tokens


def test_planned_uneven_group_matches_single_device_and_refuses_a_slow_device(tiny_llama_q4_0, tmp_path):
    model = str(tiny_llama_q4_0)
    ref_logits, ref_tokens = greedy(build_local_engine(EngineOptions(model=model)))

    snail = tmp_path / "snail.json"
    snail.write_text(json.dumps(profile("snail", 0.001)))
    said: list = []
    box: dict = {}

    def serve() -> None:
        try:
            box["group"] = start_group(GroupOptions(
                model=model, devices=3, local_workers=1, host="127.0.0.1", port=box["port"], leave_out=True,
                profile=profile("master", 100.0), worker_profile=profile("ignored", 50.0),
                config_dir=tmp_path / "config", cache_dir=tmp_path / "cache", join_timeout_s=120),
                on_event=said.append)
        except Exception as e:  # handed to the test thread
            box["error"] = e

    from tpi.transport.security import master_token

    box["port"] = free_port_pair()
    token = master_token(tmp_path / "config")
    master = threading.Thread(target=serve)
    master.start()
    deadline = time.monotonic() + 120  # the control port listens once the master says how to join
    while not any(isinstance(e, WaitingForDevices) for e in said) and master.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    remote = subprocess.run(
        [sys.executable, "-m", "tpi", "join", f"127.0.0.1:{box['port']}", "--token", token, "--name", "snail",
         "--cache-dir", str(tmp_path / "snail-cache"), "--key-dir", str(tmp_path / "snail-keys"),
         "--profile-file", str(snail)],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    master.join(timeout=300)
    assert "error" not in box, box.get("error")
    group = box["group"]
    try:
        # The slow device heard why it was turned away, and the group went on without it.
        assert remote.returncode != 0
        assert "left this device out" in remote.stderr and "ms/token" in remote.stderr
        left_out = [e for e in said if isinstance(e, DeviceLeftOut)]
        assert [e.name for e in left_out] == ["snail"] and str(left_out[0]).startswith("left out snail: ")
        plan, = [e.plan for e in said if isinstance(e, GroupPlanned)]
        assert plan.names == ("master", "local-1")
        assert plan.ratios[0] == pytest.approx(2 / 3, abs=0.01)
        assert group.engine.comm.world == 2
        status = group.status()
        master_st, worker_st = status["devices"]
        assert master_st["plan"]["ratio"] == pytest.approx(2 / 3, abs=0.01)
        # rank 0 holds more heads than the half-speed worker: the shards really are uneven
        assert master_st["share"]["q_heads"][1] - master_st["share"]["q_heads"][0] > \
            worker_st["share"]["q_heads"][1] - worker_st["share"]["q_heads"][0]
        # the worker's handshake profile arrived intact (its name is the one it joined with)
        assert worker_st["profile"] == profile("local-1", 50.0)
        assert worker_st["plan"]["link"]["rtt_ms"] > 0 and worker_st["plan"]["link"]["mbit_s"] > 0
        assert status["plan"]["left_out"][0][0] == "snail"
        logits, tokens = greedy(group.engine, forced=ref_tokens)
    finally:
        group.close()

    decode_ref, decode = ref_logits[-TOKENS:], logits[-TOKENS:]
    top2 = np.sort(decode_ref, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2 * np.abs(decode - decode_ref).max(-1)
    assert clear.sum() >= TOKENS // 2, "too many near-ties for this prompt to test anything"
    np.testing.assert_array_equal(decode.argmax(-1)[clear], decode_ref.argmax(-1)[clear])
    same_until = int(np.argmin(clear)) if not clear.all() else TOKENS
    assert tokens[:same_until] == ref_tokens[:same_until]

