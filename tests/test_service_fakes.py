"""Fakes for service, API and TUI tests (no tests here): a scripted stand-in for tpi.master.generate.Engine."""
from __future__ import annotations

import queue
import threading
from types import SimpleNamespace

from tpi.errors import GroupError
from tpi.master.generate import Generation

WORDS = ("alpha ", "beta ", "gamma ", "delta ", "epsilon ", "zeta ", "eta ", "theta ")


class FakeTokenizer:
    vocab_size = 1000

    def encode(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        return ([1] if add_bos else []) + [2 + ord(c) % 990 for c in text]

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return self.encode("".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>")


class FakeEngine:
    """Token i of an answer is WORDS[i % 8]; generation waits on `gate` before every token."""

    def __init__(self, context: int = 256):
        self.cfg = SimpleNamespace(name="fake-model")
        self.context = context
        self.tokenizer = FakeTokenizer()
        self.gate = threading.Event()
        self.gate.set()
        self.started: queue.Queue = queue.Queue()  # prompt of each generate() call, in call order
        self.calls: list[dict] = []
        self.fail_next: Exception | None = None
        self.running = 0
        self.max_running = 0
        self._lock = threading.Lock()

    def generate(self, prompt, params, max_tokens, *, stop=(), ignore_eos=False, on_text=None, cancel=None):
        with self._lock:
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        try:
            self.calls.append({"prompt": list(prompt), "params": params, "max_tokens": max_tokens,
                               "stop": tuple(stop), "ignore_eos": ignore_eos})
            self.started.put(list(prompt))
            if self.fail_next is not None:
                err, self.fail_next = self.fail_next, None
                raise err
            out = Generation(prompt_tokens=len(prompt), prefill_tokens=len(prompt), ttft_s=0.01)
            for i in range(max_tokens):
                self.gate.wait(10)
                if cancel is not None and cancel.is_set():
                    out.finish_reason = "cancelled"
                    break
                word = WORDS[i % len(WORDS)]
                out.tokens.append(100 + i)
                out.text += word
                if on_text:
                    on_text(word)
            return out
        finally:
            with self._lock:
                self.running -= 1


def device_lost() -> GroupError:
    return GroupError("device 'phone' stopped answering; check its network and rejoin")


def expected_text(n: int) -> str:
    return "".join(WORDS[i % len(WORDS)] for i in range(n))
