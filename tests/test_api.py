"""The OpenAI-compatible app in process (FastAPI TestClient) over a scripted fake engine."""
from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from test_service_fakes import FakeEngine, device_lost, expected_text

from tpi.serve.api import create_app
from tpi.master.sampler import SamplingParams
from tpi.serve.service import GenerationRequest, GenerationService

KEY = "sk-test-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
def engine():
    return FakeEngine(context=128)


@pytest.fixture
def service(engine):
    svc = GenerationService(engine, queue_size=1)
    yield svc
    engine.gate.set()
    svc.close()


@pytest.fixture
def client(service):
    with TestClient(create_app(service)) as c:
        yield c


def chat_body(**kw) -> dict:
    return {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3} | kw


def sse_events(resp) -> list[str]:
    return [line[len("data: "):] for line in resp.iter_lines() if line.startswith("data: ")]


def assert_openai_error(resp, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert isinstance(err["message"], str) and err["message"] and "type" in err
    if code:
        assert err["code"] == code
    return err


def test_models_lists_the_served_model_with_its_context(client):
    data = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in data] == ["fake-model"] and data[0]["context_length"] == 128


@pytest.mark.parametrize("name", ["tpi", "gpt-4o", None])
def test_any_requested_model_name_is_answered_by_the_served_model(client, name):
    body = chat_body() | {"model": name}
    out = client.post("/v1/chat/completions", json=body)
    assert out.status_code == 200, out.text
    assert out.json()["model"] == "fake-model" and out.json()["choices"][0]["message"]["content"] == expected_text(3)
    text = client.post("/v1/completions", json={"model": name, "prompt": "abc", "max_tokens": 2}).json()
    assert text["model"] == "fake-model"
    with client.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as resp:
        events = [json.loads(e) for e in sse_events(resp)[:-1]]
    assert {e["model"] for e in events} == {"fake-model"}
    assert client.get(f"/v1/models/{name or 'x'}").json()["id"] == "fake-model"


def test_health_reports_ok(client):
    assert client.get("/health").json()["status"] == "ok"


def test_chat_completion_returns_the_text_and_usage(client, engine):
    out = client.post("/v1/chat/completions", json=chat_body(max_tokens=4)).json()
    assert out["object"] == "chat.completion"
    assert out["choices"][0]["message"] == {"role": "assistant", "content": expected_text(4)}
    assert out["choices"][0]["finish_reason"] == "length"
    prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert out["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 4, "total_tokens": len(prompt) + 4}
    assert engine.calls[0]["prompt"] == prompt


def test_sampling_fields_reach_the_engine(client, engine):
    client.post("/v1/chat/completions", json=chat_body(temperature=0.3, top_p=0.5, seed=7, stop=["\n", "END"],
                                                       max_completion_tokens=2, top_k=5))
    call = engine.calls[0]
    p = call["params"]
    assert (p.temperature, p.top_p, p.seed, p.top_k) == (0.3, 0.5, 7, 5)
    assert call["stop"] == ("\n", "END") and call["max_tokens"] == 2


def test_streamed_chat_sends_role_then_deltas_then_finish_then_done(client):
    with client.stream("POST", "/v1/chat/completions",
                       json=chat_body(stream=True, stream_options={"include_usage": True})) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = sse_events(resp)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == expected_text(3)
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 3 and chunks[-1]["choices"] == []


def test_text_completion_accepts_a_string_or_token_ids(client, engine):
    out = client.post("/v1/completions", json={"model": "fake-model", "prompt": "abc", "max_tokens": 2}).json()
    assert out["object"] == "text_completion" and out["choices"][0]["text"] == expected_text(2)
    assert engine.calls[0]["prompt"] == engine.tokenizer.encode("abc")
    client.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 1})
    assert engine.calls[1]["prompt"] == [5, 6, 7]
    with client.stream("POST", "/v1/completions", json={"prompt": "x", "max_tokens": 2, "stream": True}) as resp:
        events = sse_events(resp)
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == expected_text(2)


@pytest.mark.parametrize(
    "body, status, code",
    [
        (chat_body(max_tokens=129), 400, None),
        (chat_body(messages=[{"role": "user", "content": "x" * 200}]), 400, "context_length_exceeded"),
        (chat_body(temperature="hot"), 422, "invalid_type"),
        (chat_body(max_tokens="ten"), 422, "invalid_type"),
        (chat_body(max_tokens=True), 422, "invalid_type"),
        (chat_body(messages="hi"), 422, "invalid_type"),
        (chat_body(messages=[{"role": "wizard", "content": "hi"}]), 422, "invalid_type"),
        (chat_body(messages=[]), 422, "invalid_type"),
        (chat_body(n=2), 422, "invalid_type"),
        (chat_body(temperature=-1), 422, "invalid_type"),
    ],
)
def test_bad_chat_requests_get_openai_errors_and_the_server_keeps_serving(client, body, status, code):
    assert_openai_error(client.post("/v1/chat/completions", json=body), status, code)
    assert client.post("/v1/chat/completions", json=chat_body(max_tokens=1)).status_code == 200


def test_n_above_one_is_refused_saying_what_to_do(client):
    err = assert_openai_error(client.post("/v1/chat/completions", json=chat_body(n=3)), 422, "invalid_type")
    assert "n: n is 3 but tpi answers one choice per request; send n separate requests" in err["message"]
    assert err["param"] == "n"


def test_features_tpi_lacks_are_refused_not_silently_ignored(client):
    for extra, name in [({"logprobs": True}, "logprobs"), ({"top_logprobs": 3}, "top_logprobs"),
                        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
                        ({"response_format": {"type": "json_object"}}, "response_format")]:
        err = assert_openai_error(client.post("/v1/chat/completions", json=chat_body(max_tokens=1, **extra)), 422)
        assert f"tpi does not support {name}: it answers plain text only" in err["message"], err
    # what SDKs send by default, and other unknown fields, still pass
    ok = chat_body(max_tokens=1, logprobs=False, tools=[], response_format={"type": "text"}, user="u", frequency_penalty=0)
    assert client.post("/v1/chat/completions", json=ok).status_code == 200
    assert_openai_error(client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, "logprobs": 2}), 422)


def test_an_unknown_route_or_method_names_the_routes_there_are(client):
    err = assert_openai_error(client.post("/v1/chat/complete", json=chat_body()), 404, "http_404")
    assert "POST /v1/chat/complete; tpi serves POST /v1/chat/completions, POST /v1/completions" in err["message"]
    resp = client.get("/v1/chat/completions")
    err = assert_openai_error(resp, 405, "http_405")
    assert "GET /v1/chat/completions; tpi serves POST /v1/chat/completions" in err["message"]
    assert resp.headers["allow"] == "POST"  # starlette's header kept
    assert client.post("/v1/chat/completions", json=chat_body(max_tokens=1)).status_code == 200


def test_malformed_json_is_a_400(client):
    resp = client.post("/v1/chat/completions", content=b'{"model": "fake-model", "messages": [',
                       headers={"Content-Type": "application/json"})
    assert "JSON" in assert_openai_error(resp, 400)["message"]


def test_completion_errors(client):
    assert_openai_error(client.post("/v1/completions", json={"prompt": ["a", "b"]}), 400)
    assert_openai_error(client.post("/v1/completions", json={"prompt": [5, 99999]}), 400)
    assert_openai_error(client.post("/v1/completions", json={"prompt": "y" * 300}), 400, "context_length_exceeded")
    assert_openai_error(client.post("/v1/completions", json={"prompt": 5}), 422)


def test_full_queue_answers_429_with_retry_after(client, engine, service):
    engine.gate.clear()
    first = service.submit(GenerationRequest((1, 2), SamplingParams(temperature=0.0), 50))
    engine.started.get(timeout=5)
    second = service.submit(first.request)  # the one waiting slot
    resp = client.post("/v1/chat/completions", json=chat_body())
    assert_openai_error(resp, 429, "queue_full")
    assert int(resp.headers["Retry-After"]) >= 1
    engine.gate.set()
    first.result(timeout=10)
    second.result(timeout=10)
    assert client.post("/v1/chat/completions", json=chat_body()).status_code == 200


def test_engine_failure_is_a_500_error_json_and_in_stream_an_error_event(client, engine):
    engine.fail_next = device_lost()
    assert "phone" in assert_openai_error(client.post("/v1/chat/completions", json=chat_body()), 500)["message"]
    engine.fail_next = device_lost()
    with client.stream("POST", "/v1/chat/completions", json=chat_body(stream=True)) as resp:
        events = sse_events(resp)
    assert events[-1] == "[DONE]" and "phone" in json.loads(events[-2])["error"]["message"]


def test_api_key_is_required_on_every_route_but_health(service):
    with TestClient(create_app(service, api_key=KEY)) as c:
        assert c.get("/health").status_code == 200
        for method, path, body in [("GET", "/v1/models", None), ("POST", "/v1/chat/completions", chat_body()),
                                   ("POST", "/v1/completions", {"prompt": "a", "max_tokens": 1}),
                                   ("GET", "/v1/tpi/status", None)]:
            assert_openai_error(c.request(method, path, json=body), 401, "invalid_api_key")
            wrong = {"Authorization": "Bearer sk-wrong"}
            assert_openai_error(c.request(method, path, json=body, headers=wrong), 401, "invalid_api_key")
            assert c.request(method, path, json=body, headers=AUTH).status_code == 200


def test_status_route_shows_devices_and_counters(engine):
    svc = GenerationService(engine, status=lambda: {"devices": [{"rank": 0, "name": "m"}, {"rank": 1, "name": "w"}]})
    try:
        with TestClient(create_app(svc)) as c:
            c.post("/v1/chat/completions", json=chat_body(max_tokens=1))
            st = c.get("/v1/tpi/status").json()
        assert [d["name"] for d in st["group"]["devices"]] == ["m", "w"] and st["service"]["completed"] == 1
    finally:
        svc.close()


def test_health_shows_speculation(client, engine):
    from tpi.cli.devices import render_devices
    from tpi.master.drafters import PromptLookup
    from tpi.master.speculation import KPolicy, SpeculationStats, Speculator

    assert client.get("/health").json()["speculation"] == {"mode": "off"}
    engine.speculator = Speculator(PromptLookup(), KPolicy(8), "auto")
    engine.speculator.totals.add(SpeculationStats(forwards=4, verify_forwards=2, drafted=6, accepted=3,
                                                  rejections=1, tokens=7))
    health = client.get("/health").json()
    spec = health["speculation"]
    assert spec["mode"] == "auto" and spec["drafter"] == "lookup"
    assert spec["spec_acceptance"] == 0.5 and spec["tokens_per_forward"] == 1.75
    assert spec["spec_acceptance_per_draft"] == 0.75  # 3 kept, 1 rejected: the rate `tpi plan --acceptance` takes
    caption = render_devices(health).caption  # what `tpi devices` prints under its table
    assert "speculation: auto (lookup), 75% of drafts kept" in caption and "1.75 tokens per forward" in caption
