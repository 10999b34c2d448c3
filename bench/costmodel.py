"""Cost model validation: predicted vs measured token latency, TTFT and peak memory on this machine.

    python bench/costmodel.py [--model PATH] [--tokens 32] [--delays-ms 1,5] [--smoke] [--json out.json]

Each configuration runs in its own process (peak RSS is per configuration): one device, a
2-device loopback group, and a 2-device group whose worker reaches the master through
tests/netproxy.py's DelayProxy (control and data ports, own process) at each delay; each with
and without memory budgets. The prediction is the planner's own, made from the real profiles
and link probes of that group (its GroupPlanned event), re-evaluated at the prompt length
and KV position that were measured. Error = predicted / measured - 1.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import run_proxy, smoke_model  # noqa: E402

from tpi.scheduler.overhead import peak_rss_bytes  # noqa: E402
from tpi.transport.keeper import free_port_pair  # noqa: E402
PROMPT = ("Tensor parallelism splits every layer of a language model across several devices, "
          "so that each one computes a share of the heads and of the MLP. Explain how")
MB = 1 << 20


# ---- one configuration (child process) ---------------------------------------------------

def measure(engine, tokens: int) -> dict:
    """Prefill PROMPT (TTFT), then time `tokens` greedy decode steps one by one."""
    import numpy as np

    ids = engine.tokenizer.encode(PROMPT, add_bos=True, special=True)
    logits = engine.forward(ids, 0)  # warm-up: first-touch allocations, kernel init
    engine.forward([int(np.argmax(logits[-1]))], len(ids))
    engine.reset()
    t = time.perf_counter()
    logits = engine.forward(ids, 0)
    ttft = time.perf_counter() - t
    per_token, pos = [], len(ids)
    for _ in range(tokens):
        tok = int(np.argmax(logits[-1]))
        t = time.perf_counter()
        logits = engine.forward([tok], pos)
        per_token.append(time.perf_counter() - t)
        pos += 1
    return {"prompt_tokens": len(ids), "ttft_s": ttft, "token_s": statistics.median(per_token), "tokens": tokens}


def predicted(plan, prompt_tokens: int, kv_position: int) -> dict:
    """The plan's prediction re-evaluated at the measured prompt length and KV position."""
    from tpi.devices.costmodel import predict

    devices = plan.devices
    params = replace(plan.prediction.params, prompt_tokens=prompt_tokens, kv_position=kv_position,
                     wire_dtype=plan.wire_dtype)
    pred = predict(plan.config, plan.shards, [d.profile for d in devices], [d.link for d in devices],
                   [d.budget for d in devices], params)
    return {"token_s": pred.token_latency_s, "ttft_s": pred.ttft_s, "comm_s": pred.comm_per_token_s,
            "layers": plan.config.n_layers, "layer_overhead_s": params.layer_overhead_s,
            "message_overhead_s": params.message_overhead_s, "cpu_share": [d.profile.cpu_share for d in devices],
            "peak": [r.peak_memory_bytes for r in pred.ranks], "compute_s": [r.compute_s for r in pred.ranks],
            "streamed": [r.streamed_bytes for r in pred.ranks], "ratios": list(plan.ratios),
            "links": [[d.link.rtt_s, d.link.bandwidth_bytes_s] for d in devices],
            "gflops": [d.profile.int4_gflops for d in devices]}


def run_config(cfg: dict) -> dict:
    from tpi.master import GroupOptions, start_group
    from tpi.master.events import GroupPlanned, WaitingForDevices
    from tpi.transport.security import master_token

    tmp = Path(cfg["tmp"])
    common = dict(model=cfg["model"], config_dir=tmp / "config", cache_dir=Path(cfg["profile_cache"]),
                  insecure=cfg["insecure"], threads=1, memory_budget=cfg["budget"], always_plan=True)
    plans: list = []

    def planned(event) -> None:
        if isinstance(event, GroupPlanned):
            plans.append(event.plan)

    helpers: list[subprocess.Popen] = []
    worker_pid = None
    try:
        if cfg["kind"] == "single":
            group = start_group(GroupOptions(**common), on_event=planned)
        elif cfg["kind"] == "loopback":
            group = start_group(GroupOptions(**common, local_workers=1, host="127.0.0.1",
                                             worker_memory_budget=cfg["budget"]), on_event=planned)
            worker_pid = group.procs[0].pid
        else:  # worker -> DelayProxy (own process) -> master, control and data ports
            port, proxy_port = free_port_pair(), free_port_pair()
            token = master_token(tmp / "config")
            proxy = subprocess.Popen([sys.executable, __file__, "--proxy", str(proxy_port), str(port),
                                      str(cfg["delay_s"])], stdout=subprocess.PIPE, text=True)
            helpers.append(proxy)
            assert proxy.stdout.readline().strip() == "ready", "the delay proxy did not start"
            cmd = [sys.executable, "-m", "tpi", "join", f"127.0.0.1:{proxy_port}", "--token", token,
                   "--data-endpoint", f"127.0.0.1:{proxy_port + 1}", "--name", "proxied", "--threads", "1",
                   "--cache-dir", str(Path(cfg["profile_cache"]) / "proxied"), "--key-dir", str(tmp / "worker-keys")]
            cmd += ["--memory-budget", str(cfg["budget"])] if cfg["budget"] else []
            cmd += ["--insecure"] if cfg["insecure"] else []
            listening = threading.Event()  # join only once the master listens: the proxy drops early connects

            def say(event) -> None:
                planned(event)
                if isinstance(event, WaitingForDevices):
                    listening.set()

            box: dict = {}
            former = threading.Thread(target=lambda: box.update(group=start_group(GroupOptions(
                **common, devices=2, host="127.0.0.1", port=port, join_timeout_s=120), on_event=say)))
            former.start()
            listening.wait(300)
            worker = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
            helpers.append(worker)
            worker_pid = worker.pid
            former.join()
            group = box["group"]
        try:
            result = measure(group.engine, cfg["tokens"])
            result["rss"] = [peak_rss_bytes()] + ([peak_rss_bytes(worker_pid)] if worker_pid else [])
        finally:
            group.close()
        if len(helpers) == 2:
            helpers[1].wait(timeout=30)  # the worker leaves once the master stops the group
    finally:
        for p in helpers:
            if p.poll() is None:
                p.kill()
                p.wait()
    kv_position = result["prompt_tokens"] + cfg["tokens"] // 2
    result["pred"] = predicted(plans[0], result["prompt_tokens"], kv_position)
    return result


# ---- orchestration ---------------------------------------------------------------------------

def configs(delays: list[float], budget: int) -> list[tuple[str, str, float, int | None]]:
    out = [("1 device", "single", 0.0, None), (f"1 device, budget {budget // MB} MiB", "single", 0.0, budget),
           ("2 devices loopback", "loopback", 0.0, None),
           (f"2 devices loopback, budgets {budget // MB} MiB", "loopback", 0.0, budget)]
    for d in delays:
        out.append((f"2 devices, proxy {d * 1e3:g} ms one-way", "proxy", d, None))
    if delays:
        d = delays[0]
        out.append((f"2 devices, proxy {d * 1e3:g} ms, budgets {budget // MB} MiB", "proxy", d, budget))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="GGUF file (default: embedded SmolLM2-135M Q4_1)")
    ap.add_argument("--tokens", type=int, default=32, help="decode steps timed per configuration")
    ap.add_argument("--delays-ms", default="1,5", help="one-way delays of the proxied links")
    # 760: SmolLM2 at context 4096 needs >= 730 MiB on one device (fp32 KV cache 180 MiB, runtime
    # ~340 MiB, prefill activations 185 MiB), and all of it pinned only a little more.
    ap.add_argument("--budget-mb", type=int, default=760, help="memory budget per device in the budget rows")
    ap.add_argument("--smoke", action="store_true", help="tiny random model, few tokens: checks the bench runs")
    ap.add_argument("--insecure", action="store_true", help="no CURVE encryption on the group links")
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--proxy", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.proxy:
        run_proxy(int(args.proxy[0]), int(args.proxy[1]), float(args.proxy[2]))
        return
    if args.child:
        print("RESULT " + json.dumps(run_config(json.loads(args.child))), flush=True)
        return
    with tempfile.TemporaryDirectory(prefix="tpi-bench-cost-") as tmp_dir:
        tmp = Path(tmp_dir)
        model = args.model or (smoke_model(tmp) if args.smoke else None)
        tokens = 4 if args.smoke else args.tokens
        delays = [float(d) / 1e3 for d in args.delays_ms.split(",") if d][: 1 if args.smoke else None]
        results = []
        runs = configs(delays, args.budget_mb * MB)
        if args.smoke:  # the unbudgeted 1-device row and the proxied row with budgets cover every code path
            runs = [runs[0], runs[-1]]
        for i, (label, kind, delay, budget) in enumerate(runs):
            cfg = {"kind": kind, "delay_s": delay, "model": model, "tokens": tokens, "budget": budget,
                   "insecure": args.insecure, "tmp": str(tmp / f"c{i}"), "profile_cache": str(tmp / "cache")}
            print(f"running: {label}", file=sys.stderr, flush=True)
            out = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], stdout=subprocess.PIPE,
                                 text=True, timeout=1800)
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:  # reported in the table; the other configurations still run
                print(f"failed: {label} (exit code {out.returncode}; its error is above)", file=sys.stderr)
                results.append({"label": label, **cfg, "failed": True})
                continue
            results.append({"label": label, **cfg, **json.loads(line[len("RESULT "):])})
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def _err(pred: float, meas: float) -> str:
    return f"{(pred / meas - 1) * 100:+.0f}%" if meas > 0 else "n/a"


def calibration(results: list[dict]) -> None:
    """The two constants the profiles cannot measure, as the unbudgeted 1-device and loopback rows imply them."""
    single = next((r for r in results if r["kind"] == "single" and not r["budget"] and not r.get("failed")), None)
    loop = next((r for r in results if r["kind"] == "loopback" and not r["budget"] and not r.get("failed")), None)
    if single is None or loop is None:
        return
    p = single["pred"]
    layers, share = p["layers"], p["cpu_share"][0]
    layer_s = p["layer_overhead_s"] + (single["token_s"] - p["token_s"]) * share / layers
    q = loop["pred"]
    messages = 2 * layers * 2 + 2  # star, 2 ranks: 2 allreduces per layer of 2 messages, broadcast, gather
    message_s = q["message_overhead_s"] + (loop["token_s"] - q["token_s"]) / messages
    print(f"\nimplied by the calibration rows (1 device, 2 devices loopback): layer_overhead_s = {layer_s * 1e6:.0f} us "
          f"(used {p['layer_overhead_s'] * 1e6:.0f}), message_overhead_s = {message_s * 1e6:.0f} us "
          f"(used {q['message_overhead_s'] * 1e6:.0f})")


def report(results: list[dict]) -> None:
    try:
        load = f", load average {os.getloadavg()[0]:.1f}"
    except OSError:
        load = ""
    done = [r for r in results if not r.get("failed")] or [{"tokens": 0, "prompt_tokens": 0}]
    print(f"machine: {os.cpu_count()} cores{load}; 1 compute thread per device; "
          f"median of {done[0]['tokens']} decode tokens at a {done[0]['prompt_tokens']}-token prompt\n")
    print("| configuration | token ms measured | predicted | error | TTFT ms measured | predicted | error "
          "| peak MiB measured (rank 0 / 1) | predicted | error (rank 0 / 1) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        if r.get("failed"):
            print(f"| {r['label']} | failed | | | | | | | | |")
            continue
        p = r["pred"]
        meas_mem = " / ".join(f"{b / MB:.0f}" for b in r["rss"])
        pred_mem = " / ".join(f"{b / MB:.0f}" for b in p["peak"])
        mem_err = " / ".join(_err(a, b) for a, b in zip(p["peak"], r["rss"]))
        print(f"| {r['label']} | {r['token_s'] * 1e3:.1f} | {p['token_s'] * 1e3:.1f} | {_err(p['token_s'], r['token_s'])} "
              f"| {r['ttft_s'] * 1e3:.0f} | {p['ttft_s'] * 1e3:.0f} | {_err(p['ttft_s'], r['ttft_s'])} "
              f"| {meas_mem} | {pred_mem} | {mem_err} |")
    calibration(results)
    print("\nplanner inputs per configuration (ratios, link RTT ms / MB/s, int4 GFLOP/s, predicted comm ms/token):")
    for r in (r for r in results if not r.get("failed")):
        p = r["pred"]
        links = ", ".join(f"{a * 1e3:.2f}/{b / 1e6:.0f}" for a, b in p["links"][1:]) or "-"
        print(f"- {r['label']}: ratios {[round(x, 3) for x in p['ratios']]}, links {links}, "
              f"GFLOP/s {[round(g, 1) for g in p['gflops']]}, comm {p['comm_s'] * 1e3:.1f}")


if __name__ == "__main__":
    main()
