"""`tpi chat`: session and commands over a fake engine; the real TUI under tmux with a loopback group."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from test_service_fakes import FakeEngine, expected_text

from tpi.serve.chat_backends import ChatOptions, LocalChat, TurnResult
from tpi.serve.service import GenerationService
from tpi.serve.tui import ChatSession, run_command, run_plain, status_line


@pytest.fixture
def engine():
    return FakeEngine(context=512)


@pytest.fixture
def session(engine):
    svc = GenerationService(engine)
    yield ChatSession(LocalChat(svc), ChatOptions(max_tokens=3, temperature=0.0))
    svc.close()


def plain(session, text: str) -> str:
    out = io.StringIO()
    assert run_plain(session, io.StringIO(text), out) == 0
    return out.getvalue()


def template(engine, *messages: tuple[str, str]) -> list[int]:
    return engine.tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages])


def test_piped_prompts_get_plain_answers_and_multi_turn_history(session, engine):
    out = plain(session, "hi\n\nthere\n")
    assert out == f"{expected_text(3)}\n{expected_text(3)}\n"
    assert "\x1b" not in out
    assert engine.calls[1]["prompt"] == template(engine, ("user", "hi"), ("assistant", expected_text(3)),
                                                 ("user", "there"))


def test_reset_and_system_start_a_new_conversation(session, engine):
    out = plain(session, "hi\n/reset\nagain\n/system be brief\nonce more\n")
    assert "conversation cleared" in out and "system prompt set to: be brief" in out
    assert engine.calls[1]["prompt"] == template(engine, ("user", "again"))
    assert engine.calls[2]["prompt"] == template(engine, ("system", "be brief"), ("user", "once more"))


def test_quit_stops_reading_input(session, engine):
    plain(session, "hi\n/quit\nnever asked\n")
    assert len(engine.calls) == 1


def test_stats_and_devices_show_numbers_and_the_group(engine):
    devices = [{"rank": 0, "name": "master", "state": "ready", "share": {"q_heads": [0, 6]}},
               {"rank": 1, "name": "phone", "state": "ready", "share": {"q_heads": [6, 9]}}]
    svc = GenerationService(engine, status=lambda: {"devices": devices})
    try:
        s = ChatSession(LocalChat(svc), ChatOptions(max_tokens=2, temperature=0.0))
        out = plain(s, "hi\n/stats\n/devices\n")
    finally:
        svc.close()
    assert "completion_tokens: 2" in out and "completed: 1" in out
    assert "2 device(s)" in out and "master ready 6 heads" in out and "phone ready 3 heads" in out
    assert "speculation" not in out  # none ran


def test_stats_show_speculation_when_it_runs(engine):
    """`tpi chat --speculate lookup`: /stats shows what /health shows (README: --stats and /health)."""
    from tpi.master.drafters import PromptLookup
    from tpi.master.speculation import KPolicy, SpeculationStats, Speculator

    engine.speculator = Speculator(PromptLookup(), KPolicy(8, adaptive=False), "lookup")
    engine.speculator.totals.add(SpeculationStats(forwards=4, verify_forwards=2, drafted=6, accepted=3,
                                                  rejections=1, tokens=7))
    svc = GenerationService(engine)
    try:
        out = plain(ChatSession(LocalChat(svc), ChatOptions(max_tokens=2)), "/stats\n")
    finally:
        svc.close()
    assert "speculation: lookup (lookup)" in out and "spec_acceptance_per_draft: 0.75" in out
    assert "tokens_per_forward: 1.75" in out


def test_remote_stats_show_the_servers_speculation(engine):
    """`tpi chat --url`: /stats reads the server's /v1/tpi/status, which carries /health's speculation."""
    from test_batching import ApiServer  # a real uvicorn on a loopback port

    from tpi.master.drafters import PromptLookup
    from tpi.master.speculation import KPolicy, SpeculationStats, Speculator
    from tpi.serve.chat_backends import RemoteChat

    engine.speculator = Speculator(PromptLookup(), KPolicy(8), "auto")
    engine.speculator.totals.add(SpeculationStats(forwards=5, verify_forwards=1, drafted=4, accepted=4, tokens=9))
    svc = GenerationService(engine)
    api = ApiServer(svc)
    try:
        stats = RemoteChat(api.url).stats()
    finally:
        api.close()
        svc.close()
    assert stats["speculation"] == "auto (lookup)" and stats["tokens_per_forward"] == 1.8
    assert stats["spec_acceptance_per_draft"] == 1.0 and "slots" in stats


def test_save_writes_the_conversation_as_json_or_markdown(session, tmp_path):
    plain(session, f"hi\n/save {tmp_path / 'chat.json'}\n/save {tmp_path / 'chat.md'}\n")
    saved = json.loads((tmp_path / "chat.json").read_text())
    assert saved["messages"] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": expected_text(3)}]
    assert "**assistant**" in (tmp_path / "chat.md").read_text()


def test_save_to_an_unwritable_path_is_an_error_not_a_crash(session, capsys):
    out = plain(session, "/save /nonexistent-dir/x.json\nhi\n")
    assert "cannot save" in capsys.readouterr().err and expected_text(3) in out


def test_a_cancelled_answer_leaves_the_history_as_it_was(session):
    session.finish("first", TurnResult("one", "stop", 5, 1, 0.1, 10.0))
    before = list(session.turns)
    session.finish("second", TurnResult("partial", "cancelled", 9, 3, 0.1, 10.0))
    assert session.turns == before and session.last.finish_reason == "cancelled"


def test_unknown_command_lists_the_commands(session):
    assert "/reset" in run_command(session, "/bogus").message


def test_status_line_shows_ttft_rate_and_devices():
    line = status_line(TurnResult("x", "stop", 5, 40, 0.25, 87.5), [{"name": "master"}, {"name": "local-1"}])
    assert "TTFT 0.25 s" in line and "87.5 tok/s" in line and "2 device(s): master, local-1" in line


# -- the real TUI under tmux ------------------------------------------------------------------

class Tmux:
    """One tmux server on a private socket, one pane."""

    def __init__(self, command: str, width: int = 110, height: int = 45):
        self.sock = f"tpi-test-{uuid.uuid4().hex[:8]}"
        subprocess.run(["tmux", "-u", "-L", self.sock, "new-session", "-d", "-s", "chat", "-x", str(width), "-y", str(height),
                        command], check=True)

    def send(self, *keys: str) -> None:
        subprocess.run(["tmux", "-L", self.sock, "send-keys", "-t", "chat", *keys], check=True)

    def screen(self) -> str:
        r = subprocess.run(["tmux", "-L", self.sock, "capture-pane", "-p", "-t", "chat", "-S", "-200"],
                           capture_output=True, text=True)
        return r.stdout

    def wait_for(self, predicate, timeout: float, what: str) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.screen()
            if predicate(text):
                return text
            if "CHAT-EXIT=" in text:
                break
            time.sleep(0.2)
        raise AssertionError(f"no {what} (timeout or exit); screen:\n{self.screen()}")

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.sock, "kill-server"], capture_output=True)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install tmux)")
def test_chat_tui_streams_handles_commands_and_ctrl_c_under_tmux(tmp_path):
    log = tmp_path / "chat.log"
    cmd = (f"{sys.executable} -m tpi chat --local-workers 1 --temperature 0 --max-tokens 600 "
           f"--config-dir {tmp_path / 'config'} --cache-dir {tmp_path / 'cache'} 2>{log}; echo CHAT-EXIT=$?; sleep 30")
    env_prefix = f"cd {Path(__file__).parent.parent} && PYTHONUNBUFFERED=1 "
    tmux = Tmux(env_prefix + cmd)
    try:
        tmux.wait_for(lambda s: "you ›" in s, 240, "the chat prompt")
        assert "2 device(s)" in tmux.screen()

        tmux.send("Name three primary colors.", "Enter")
        screen = tmux.wait_for(lambda s: "tok/s" in s, 120, "the first answer and its status line")
        assert "Red" in screen and "TTFT" in screen and "master" in screen

        tmux.send("/stats", "Enter")
        tmux.wait_for(lambda s: "decode_tok_s" in s and "history_messages" in s, 30, "/stats")
        tmux.send("/reset", "Enter")
        # the next prompt, not just the message: keys typed before it is drawn can be lost on a busy machine
        tmux.wait_for(lambda s: "conversation cleared" in s and "you ›" in s.split("conversation cleared")[-1], 30,
                      "/reset and the next prompt")

        marker = tmux.screen().count("tok/s")
        tmux.send("Write a very long story about a dragon who learns to bake bread.", "Enter")
        tmux.wait_for(lambda s: "bake bread." in s and len(s.split("bake bread.")[-1].split()) > 12, 120,
                      "the story to stream")
        tmux.send("C-c")
        tmux.wait_for(lambda s: "answer stopped" in s, 60, "Ctrl-C to stop the answer")

        tmux.send("What is 2 + 2?", "Enter")
        tmux.wait_for(lambda s: s.count("tok/s") >= marker + 2, 120, "an answer after Ctrl-C")
        tmux.send("/quit", "Enter")
        tmux.wait_for(lambda s: "CHAT-EXIT=0" in s, 30, "the chat to exit with code 0")
        assert "error" not in log.read_text().lower()
    finally:
        tmux.close()
