"""Continuous batching through the service and the OpenAI API (issue 17): `--parallel N` KV slots.

The reference is the same model answering each request alone (a one-slot engine, Engine.generate).
Identity rule: a batched row's logits equal its lone twin's bit for bit when the matmul kernels round
a batched row as a lone one (tests/test_rows.py: Q4_0/Q4_1/Q5_x/Q8_0 weights at every row count;
the tiny models here are Q4_0 and SmolLM2 is Q4_1 + Q8_0), so greedy tokens must be equal, every
one. On K-quant or F16 weights the near-tie rule of tests/test_layers_ggml_group.py would apply
instead (tokens equal up to the first step whose top-2 logits are closer than the rounding).
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import uvicorn

from tpi.cli.devices import render_devices
from tpi.master.options import EngineOptions
from tpi.master.sampler import SamplingParams
from tpi.master.setup import build_local_engine
from tpi.serve.api import bind_listener, create_app
from tpi.serve.service import GenerationRequest, GenerationService

CONTEXT = 256
QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "Count from one to five.",
             "Why is the sky blue? Answer in one long sentence, with every detail you know of."]
MAX_TOKENS = [12, 20, 9, 16]  # per request: they finish at different steps and free their slots


class ApiServer:
    """The OpenAI API over a service, served by uvicorn on a loopback port in this process."""

    def __init__(self, service: GenerationService):
        sock = bind_listener("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=120)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def chat_ids(tokenizer, question: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}])


def alone(engine, question: str, max_tokens: int) -> str:
    """The text one greedy request gets on its own."""
    ids = chat_ids(engine.tokenizer, question)
    return engine.generate(ids, SamplingParams(temperature=0.0), max_tokens).text


@pytest.fixture(scope="module")
def tiny_model(tiny_gguf):
    return str(tiny_gguf("tiny_llama_q4_0"))  # its own small BPE vocabulary and a ChatML template


@pytest.fixture(scope="module")
def reference(tiny_model):
    return build_local_engine(EngineOptions(model=tiny_model, context=CONTEXT, backend="ggml", threads=1))


@pytest.fixture(scope="module")
def served(tiny_model):
    engine = build_local_engine(EngineOptions(model=tiny_model, context=CONTEXT, backend="ggml", threads=1, slots=4))
    service = GenerationService(engine, queue_size=2, prefill_budget=16)
    api = ApiServer(service)
    yield service, api
    api.close()
    service.close()


def ask(client, question: str, max_tokens: int) -> str:
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}],
                                       max_tokens=max_tokens, temperature=0)
    assert r.usage.completion_tokens <= max_tokens
    return r.choices[0].message.content


def test_four_concurrent_greedy_requests_each_get_their_lone_answer(served, reference):
    service, api = served
    want = [alone(reference, q, n) for q, n in zip(QUESTIONS, MAX_TOKENS)]
    assert len(set(want)) == 4 and all(want), want  # four different answers to tell apart
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda qn: ask(api.client, *qn), zip(QUESTIONS, MAX_TOKENS)))
    assert got == want


def test_requests_admitted_together_share_their_steps(served, reference):
    service, _ = served
    prompts = [chat_ids(reference.tokenizer, q) for q in QUESTIONS]
    with service.engine.lock:  # the loop admits all four before its first step
        tickets = [service.submit(GenerationRequest(tuple(p), SamplingParams(temperature=0.0), n))
                   for p, n in zip(prompts, MAX_TOKENS)]
        while service.snapshot()["running"] < 4:
            time.sleep(0.01)
        steps0 = service.batch.steps
    assert [t.result(timeout=120).text for t in tickets] == [alone(reference, q, n) for q, n in zip(QUESTIONS, MAX_TOKENS)]
    # one step per token of the longest answer plus the prompt chunks of 16 (every prompt read in turn)
    assert service.batch.steps - steps0 <= max(MAX_TOKENS) + -(-sum(map(len, prompts)) // 16) + 1


def test_a_disconnected_stream_frees_its_slot_and_the_others_go_on_unchanged(served, reference):
    service, api = served
    want = [alone(reference, q, n) for q, n in zip(QUESTIONS[:2], MAX_TOKENS[:2])]
    before = service.snapshot()["cancelled"]
    with ThreadPoolExecutor(2) as pool:
        others = [pool.submit(ask, api.client, q, n) for q, n in zip(QUESTIONS[:2], MAX_TOKENS[:2])]
        stream = api.client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": QUESTIONS[3]}], max_tokens=200, temperature=0,
            stream=True, extra_body={"ignore_eos": True})
        for i, _ in enumerate(stream):
            if i == 3:
                break
        stream.close()  # the client goes away mid-answer
        assert [f.result() for f in others] == want
    deadline = time.monotonic() + 30
    while service.snapshot()["running"] or service.snapshot()["cancelled"] == before:
        assert time.monotonic() < deadline, service.snapshot()
        time.sleep(0.05)
    snap = service.snapshot()
    assert snap["cancelled"] == before + 1 and snap["slots"] == 4 and snap["queued"] == 0


def test_requests_past_the_slots_queue_and_past_the_queue_get_429(served, reference):
    service, api = served
    req = GenerationRequest(tuple(chat_ids(reference.tokenizer, QUESTIONS[0])), SamplingParams(temperature=0.0),
                            60, ignore_eos=True)
    with service.engine.lock:  # no step runs meanwhile: the six hold their places
        tickets = [service.submit(req) for _ in range(6)]  # 4 slots + a queue of 2
        health = api.client._client.get(api.url + "/health").json()
        assert health["running"] + health["queued"] == 6 and health["slots"] == 4
        caption = render_devices(health).caption  # what `tpi devices` prints under its table
        assert f"{health['running']} running in 4 slots, {health['queued']} queued of at most 2" in caption
        with pytest.raises(openai.RateLimitError) as e:
            api.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert int(e.value.response.headers["Retry-After"]) >= 1
    texts = {t.result(timeout=120).text for t in tickets}
    assert len(texts) == 1  # the same greedy request gives the same answer in any slot, queued or not


def test_a_slot_reuses_a_cached_prefix_and_answers_as_a_cold_run(served, reference):
    """--prompt-cache per slot: a second turn that starts with the first turn's tokens skips them. On
    Q4_0-class weights the reused rows are the rows a cold run computes (the rule above), so the answer is
    the cold run's; on other weights it may differ in the last bits, as --prompt-cache says."""
    service, _ = served
    first = chat_ids(reference.tokenizer, QUESTIONS[0])
    service.engine.reuse_prefix = True
    try:
        turn1 = service.submit(GenerationRequest(tuple(first), SamplingParams(temperature=0.0), 8)).result(timeout=60)
        second = first + turn1.tokens + chat_ids(reference.tokenizer, QUESTIONS[1])[1:]
        turn2 = service.submit(GenerationRequest(tuple(second), SamplingParams(temperature=0.0), 8)).result(timeout=60)
    finally:
        service.engine.reuse_prefix = False
    assert turn2.prefill_tokens <= len(second) - len(first)  # the first turn's prompt was not read again
    cold = reference.generate(second, SamplingParams(temperature=0.0), 8)
    assert turn2.tokens == cold.tokens and turn2.text == cold.text


@pytest.mark.slow
def test_a_two_device_group_batches_four_requests_as_it_runs_each_alone(tiny_model, tmp_path):
    from tpi.master.options import GroupOptions
    from tpi.master.setup import start_group

    group = start_group(GroupOptions(model=tiny_model, local_workers=1, slots=4, context=CONTEXT, threads=1,
                                     backend="ggml", worker_backend="ggml", insecure=True, wire_dtype="f32",
                                     config_dir=tmp_path / "config", cache_dir=tmp_path / "cache"))
    try:
        engine = group.engine
        want = [alone(engine, q, n) for q, n in zip(QUESTIONS, MAX_TOKENS)]  # this group, one request at a time
        service = GenerationService(engine, queue_size=2, prefill_budget=16)
        try:
            prompts = [chat_ids(engine.tokenizer, q) for q in QUESTIONS]
            steps0 = engine.model.comm.stats.steps
            with engine.lock:
                tickets = [service.submit(GenerationRequest(tuple(p), SamplingParams(temperature=0.0), n))
                           for p, n in zip(prompts, MAX_TOKENS)]
                while service.snapshot()["running"] < 4:
                    time.sleep(0.01)
            assert [t.result(timeout=120).text for t in tickets] == want
            assert engine.model.comm.stats.steps - steps0 < sum(MAX_TOKENS)  # the worker saw shared steps
        finally:
            service.close()
    finally:
        group.close()


@pytest.mark.slow
def test_a_soak_of_mixed_requests_at_concurrency_six_loses_none_and_rss_stays_bounded(served, reference):
    """240 requests, 6 at a time (4 slots + a queue of 2): plain, streamed, streams dropped mid-answer,
    sampled, with stop strings, too long (400); each is answered or refused clearly, none hangs."""
    from tpi.scheduler.overhead import rss_bytes

    service, api = served
    before = service.snapshot()
    long_prompt = "word " * (CONTEXT + 10)

    def one(i: int) -> str:
        kind = i % 6
        msgs = [{"role": "user", "content": QUESTIONS[i % 4] + f" #{i}"}]
        try:
            if kind == 0:
                r = api.client.chat.completions.create(model="tiny", messages=msgs, max_tokens=1 + i % 24, temperature=0)
                assert r.choices[0].finish_reason in ("stop", "length")
                return "answered"
            if kind in (1, 2):
                stream = api.client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4 + i % 20,
                                                            temperature=0.8, seed=i, stream=True)
                chunks = 0
                for _ in stream:
                    chunks += 1
                    if kind == 2 and chunks == 3:
                        stream.close()  # the client goes away
                        return "dropped"
                return "answered"
            if kind == 3:
                r = api.client.completions.create(model="tiny", prompt=QUESTIONS[i % 4], max_tokens=6, stop=["e", "a"])
                assert all(s not in r.choices[0].text for s in ("e", "a")), repr(r.choices[0].text)
                return "answered"
            if kind == 4:
                with pytest.raises(openai.BadRequestError, match="context"):
                    api.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": long_prompt}])
                return "refused"
            r = api.client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0,
                                                   extra_body={"ignore_eos": True})
            assert r.usage.completion_tokens == 12
            return "answered"
        except openai.RateLimitError as e:  # past the slots and the queue: a clear refusal with a wait
            assert int(e.response.headers["Retry-After"]) >= 1
            return "busy"

    with ThreadPoolExecutor(6) as pool:
        warm = list(pool.map(one, range(40)))
        rss_warm = rss_bytes()
        rest = list(pool.map(one, range(40, 240)))
    outcomes = warm + rest
    assert len(outcomes) == 240 and outcomes.count("refused") == 40
    assert outcomes.count("answered") >= 150, {k: outcomes.count(k) for k in set(outcomes)}
    deadline = time.monotonic() + 30
    while service.snapshot()["running"] or service.snapshot()["queued"]:
        assert time.monotonic() < deadline, service.snapshot()
        time.sleep(0.05)
    snap = service.snapshot()
    ran = {k: snap[k] - before[k] for k in ("submitted", "completed", "cancelled", "failed", "rejected")}
    assert ran["failed"] == 0 and ran["submitted"] == ran["completed"] + ran["cancelled"]
    assert ran["rejected"] == outcomes.count("busy")
    assert rss_bytes() - rss_warm < 64 << 20  # 200 more requests hold no memory of theirs


def test_an_error_in_one_sequence_ends_only_that_sequence(tiny_model, reference):
    from tpi.master.batch import Batch, Running
    from tpi.master.generate import SequenceState

    engine = build_local_engine(EngineOptions(model=tiny_model, context=CONTEXT, backend="ggml", threads=1, slots=2))
    batch, ends = Batch(engine, prefill_budget=16), {}

    def start(i: int, on_text) -> None:
        seq = SequenceState.start(chat_ids(engine.tokenizer, QUESTIONS[i]), SamplingParams(temperature=0.0),
                                  MAX_TOKENS[i], engine.tokenizer)
        batch.admit(Running(seq, on_text, lambda gen, err: ends.__setitem__(i, (gen, err)), lambda: False))

    def broken(piece: str) -> None:
        raise RuntimeError("the receiver of this answer broke")

    start(0, broken)
    start(1, lambda piece: None)
    while batch.running:
        batch.step()
    (gen0, err0), (gen1, err1) = ends[0], ends[1]
    assert gen0 is None and "receiver of this answer broke" in str(err0)
    assert err1 is None and gen1.text == alone(reference, QUESTIONS[1], MAX_TOKENS[1])
