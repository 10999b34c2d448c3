"""Where `tpi chat` sends a conversation: the in-process service, or any OpenAI-compatible server."""
from __future__ import annotations

import json
import queue
import threading
import time
from dataclasses import dataclass

from tpi.errors import TpiError
from tpi.serve.service import GenerationRequest, GenerationService, ServiceEvent, sampling_params


@dataclass(frozen=True)
class ChatOptions:
    max_tokens: int = 512
    temperature: float = 0.7
    top_p: float | None = None
    seed: int | None = None


@dataclass(frozen=True)
class TurnResult:
    """One finished answer, with the numbers the status line shows."""

    text: str
    finish_reason: str  # stop | length | cancelled
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    decode_tok_s: float


class Turn:
    """A running answer: events ('text', then one 'done' with a TurnResult, or 'error') and cancel()."""

    def __init__(self):
        self.events: queue.Queue[ServiceEvent] = queue.Queue()
        self._cancel_hooks: list = []

    def cancel(self) -> None:
        for hook in self._cancel_hooks:
            hook()


class LocalChat:
    """The conversation runs on this master's GenerationService."""

    def __init__(self, service: GenerationService):
        self.service = service
        self.model_name = service.model_name
        service.engine.reuse_prefix = True  # each turn extends the last: reuse its keys and values

    def start(self, messages: list[dict], opts: ChatOptions) -> Turn:
        ids = self.service.tokenizer.apply_chat_template(messages)
        params = sampling_params(opts.temperature, opts.top_p, opts.seed)
        turn = Turn()

        def forward(ev: ServiceEvent) -> None:
            if ev.kind == "done":
                g = ev.generation
                ev = ServiceEvent("done", generation=TurnResult(g.text, g.finish_reason, g.prompt_tokens,
                                                                len(g.tokens), g.ttft_s, g.stats()["decode_tok_s"]))
            turn.events.put(ev)

        max_tokens = min(opts.max_tokens, max(1, self.service.context - len(ids)))
        ticket = self.service.submit(GenerationRequest(tuple(ids), params, max_tokens), sink=forward)
        turn._cancel_hooks.append(ticket.cancel)
        return turn

    def devices(self) -> list[dict]:
        return list(self.service.status().get("devices", []))

    def stats(self) -> dict:
        spec = getattr(self.service.engine, "speculator", None)
        return with_speculation(self.service.snapshot(), spec.status() if spec is not None else None)


class RemoteChat:
    """The conversation runs on an OpenAI-compatible server (`tpi serve` or any other) over HTTP."""

    def __init__(self, url: str, api_key: str | None = None, model: str | None = None, timeout_s: float = 600.0):
        import httpx  # remote chat only: local chat starts without it

        base = url.rstrip("/")
        self.base = base if base.endswith("/v1") else base + "/v1"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout_s, connect=10.0))
        self.model_name = model or self._first_model()

    def _get(self, path: str) -> dict:
        import httpx  # remote chat only: local chat starts without it

        try:
            r = self.http.get(self.base + path)
        except httpx.HTTPError as e:
            raise TpiError(f"cannot reach {self.base}: {e}; check --url and that the server runs") from None
        if r.status_code != 200:
            raise TpiError(f"{self.base}{path} answered {r.status_code}: {_error_message(r.text)}")
        return r.json()

    def _first_model(self) -> str:
        data = self._get("/models").get("data") or []
        if not data:
            raise TpiError(f"{self.base}/models lists no model; pass --model")
        return data[0]["id"]

    def start(self, messages: list[dict], opts: ChatOptions) -> Turn:
        body = {"model": self.model_name, "messages": messages, "stream": True, "max_tokens": opts.max_tokens,
                "temperature": opts.temperature, "stream_options": {"include_usage": True}}
        if opts.top_p is not None:
            body["top_p"] = opts.top_p
        if opts.seed is not None:
            body["seed"] = opts.seed
        turn, stop = Turn(), threading.Event()
        turn._cancel_hooks.append(stop.set)
        threading.Thread(target=self._stream, args=(body, turn, stop), daemon=True).start()
        return turn

    def _stream(self, body: dict, turn: Turn, stop: threading.Event) -> None:
        """Read the SSE stream; leaving early closes the connection, which cancels the server's work."""
        import httpx  # remote chat only: local chat starts without it

        t0 = time.perf_counter()
        first = None
        pieces, finish, usage = [], "length", {}
        try:
            with self.http.stream("POST", self.base + "/chat/completions", json=body) as r:
                if r.status_code != 200:
                    raise TpiError(f"the server answered {r.status_code}: {_error_message(r.read().decode())}")
                for line in r.iter_lines():
                    if stop.is_set():
                        finish = "cancelled"
                        break
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise TpiError(f"the server failed: {chunk['error'].get('message')}")
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices", []):
                        text = (choice.get("delta") or {}).get("content") or ""
                        if text:
                            first = first or time.perf_counter()
                            pieces.append(text)
                            turn.events.put(ServiceEvent("text", text=text))
                        finish = choice.get("finish_reason") or finish
        except TpiError as e:
            turn.events.put(ServiceEvent("error", error=e))
            return
        except (httpx.HTTPError, json.JSONDecodeError) as e:
            turn.events.put(ServiceEvent("error", error=TpiError(f"the stream from {self.base} broke: {e}")))
            return
        end = time.perf_counter()
        completion = usage.get("completion_tokens", len(pieces))
        decode_s = end - first if first else 0.0
        turn.events.put(ServiceEvent("done", generation=TurnResult(
            "".join(pieces), finish, usage.get("prompt_tokens", 0), completion,
            (first or end) - t0, (completion - 1) / decode_s if decode_s > 0 and completion > 1 else 0.0)))

    def devices(self) -> list[dict]:
        try:
            return list(self._get("/tpi/status").get("group", {}).get("devices", []))
        except TpiError:
            return [{"name": self.base, "state": "remote (not a tpi server: no device list)"}]

    def stats(self) -> dict:
        try:
            service = self._get("/tpi/status").get("service", {})
        except TpiError:
            return {}
        return with_speculation({k: v for k, v in service.items() if k != "speculation"}, service.get("speculation"))


def with_speculation(stats: dict, spec: dict | None) -> dict:
    """/stats rows: the service's counters, then speculation's figures (as /health and `tpi run --stats`)."""
    if not spec or spec.get("mode", "off") == "off":
        return stats
    return {**stats, "speculation": f"{spec['mode']} ({spec.get('drafter', '?')})",
            **{k: spec[k] for k in ("spec_acceptance_per_draft", "tokens_per_forward") if k in spec}}


def _error_message(text: str) -> str:
    try:
        return json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return text[:200]
