"""GenerationService: FIFO order, one sequence at a time, bounded queue, cancellation, errors."""
from __future__ import annotations

import threading

import pytest

from test_service_fakes import FakeEngine, device_lost, expected_text
from tpi.errors import ContextOverflowError, GroupError, QueueFullError, RequestError
from tpi.master.sampler import SamplingParams
from tpi.serve.service import GenerationRequest, GenerationService, stop_strings

GREEDY = SamplingParams(temperature=0.0)


def req(prompt=(1, 2, 3), max_tokens=4, **kw) -> GenerationRequest:
    return GenerationRequest(tuple(prompt), GREEDY, max_tokens, **kw)


@pytest.fixture
def engine():
    return FakeEngine(context=64)


@pytest.fixture
def service(engine):
    svc = GenerationService(engine, queue_size=2)
    yield svc
    engine.gate.set()
    svc.close()


def test_result_streams_every_piece_and_returns_the_generation(service):
    pieces = []
    gen = service.submit(req(max_tokens=5)).result(on_text=pieces.append, timeout=10)
    assert "".join(pieces) == gen.text == expected_text(5)
    assert gen.finish_reason == "length" and len(gen.tokens) == 5


def test_requests_run_one_at_a_time_in_submission_order(service, engine):
    engine.gate.clear()
    tickets = [service.submit(req(prompt=(1, i), max_tokens=3)) for i in range(3)]
    assert engine.started.get(timeout=5) == [1, 0]
    assert service.snapshot()["queued"] == 2 and service.snapshot()["busy"]
    engine.gate.set()
    for t in tickets:
        t.result(timeout=10)
    assert [c["prompt"] for c in engine.calls] == [[1, 0], [1, 1], [1, 2]]
    assert engine.max_running == 1


def test_full_queue_raises_with_a_retry_hint_and_counts_the_rejection(service, engine):
    engine.gate.clear()
    running = service.submit(req())
    engine.started.get(timeout=5)
    waiting = [service.submit(req()), service.submit(req())]
    with pytest.raises(QueueFullError) as exc:
        service.submit(req())
    assert exc.value.retry_after_s >= 1
    assert service.snapshot()["rejected"] == 1
    engine.gate.set()
    for t in [running, *waiting]:
        assert t.result(timeout=10).finish_reason == "length"


def test_cancelling_a_waiting_request_frees_its_slot_and_it_never_runs(service, engine):
    engine.gate.clear()
    running = service.submit(req(prompt=(1, 0)))
    engine.started.get(timeout=5)
    doomed = service.submit(req(prompt=(1, 1)))
    kept = service.submit(req(prompt=(1, 2)))
    doomed.cancel()
    assert doomed.result(timeout=5).finish_reason == "cancelled"
    service.submit(req(prompt=(1, 3)))  # the freed slot takes a new request
    engine.gate.set()
    kept.result(timeout=10)
    running.result(timeout=10)
    assert [1, 1] not in [c["prompt"] for c in engine.calls]


def test_cancelling_the_running_request_lets_the_next_one_start(service, engine):
    engine.gate.clear()
    long = service.submit(req(prompt=(1, 0), max_tokens=60))
    engine.started.get(timeout=5)
    nxt = service.submit(req(prompt=(1, 1), max_tokens=2))
    long.cancel()
    engine.gate.set()
    assert long.result(timeout=10).finish_reason == "cancelled"
    assert nxt.result(timeout=10).text == expected_text(2)
    snap = service.snapshot()
    assert snap["cancelled"] == 1 and snap["completed"] == 1


def test_an_engine_error_fails_that_request_only(service, engine):
    engine.fail_next = device_lost()
    with pytest.raises(GroupError, match="phone"):
        service.submit(req()).result(timeout=10)
    assert service.submit(req(max_tokens=2)).result(timeout=10).text == expected_text(2)
    assert service.snapshot()["failed"] == 1


def test_a_bug_in_the_engine_becomes_a_tpi_error_and_the_service_survives(service, engine):
    engine.fail_next = ZeroDivisionError("boom")
    with pytest.raises(Exception, match="internal error.*boom"):
        service.submit(req()).result(timeout=10)
    assert service.submit(req(max_tokens=1)).result(timeout=10).text == expected_text(1)


def test_a_broken_sink_cancels_its_request_without_killing_the_worker(service, engine):
    def broken(ev):
        raise RuntimeError("event loop is closed")

    ticket = service.submit(req(max_tokens=50), sink=broken)
    assert ticket.finished.wait(10)
    assert service.submit(req(max_tokens=2)).result(timeout=10).text == expected_text(2)


@pytest.mark.parametrize(
    "request_, error",
    [
        (req(prompt=()), ContextOverflowError),
        (req(prompt=range(64)), ContextOverflowError),
        (req(max_tokens=65), RequestError),
        (req(max_tokens=0), RequestError),
    ],
)
def test_requests_that_cannot_fit_the_context_are_refused_before_queueing(service, request_, error):
    with pytest.raises(error):
        service.submit(request_)
    assert service.snapshot()["submitted"] == 0


def test_close_fails_waiting_requests_and_refuses_new_ones(engine):
    svc = GenerationService(engine, queue_size=4)
    engine.gate.clear()
    running = svc.submit(req(max_tokens=30))
    engine.started.get(timeout=5)
    waiting = svc.submit(req())
    closer = threading.Thread(target=svc.close)
    closer.start()
    engine.gate.set()
    closer.join(10)
    with pytest.raises(RequestError, match="shut down"):
        waiting.result(timeout=5)
    assert running.result(timeout=5).finish_reason == "cancelled"
    with pytest.raises(RequestError):
        svc.submit(req())


def test_stop_strings_accepts_one_string_or_a_list():
    assert stop_strings(None) == ()
    assert stop_strings("\n") == ("\n",)
    assert stop_strings(["a", "", "b"]) == ("a", "b")
