"""`posttrain serve-model` as a user runs it: a real subprocess on a free port against the finished tiny run (the
`finished` fixture in tests/conftest.py), driven with the official `openai` client; its answers are the engine's
own greedy samples of the same conversation."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest
from runs import cli_here

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Say the number 7."},
    {"role": "assistant", "content": "Number 7. Done."},
    {"role": "user", "content": "Say the number 12."},
]
READY = "serve-model: run "
ANSWER_TOKENS = 12
START_SECONDS = 300


@dataclass
class Server:
    """A `posttrain serve-model` subprocess and everything it has printed so far."""

    proc: subprocess.Popen
    lines: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    def follow(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:  # stderr is merged in: the one line printed when it stops
            self.lines.append(line.rstrip("\n"))

    def url(self, prefix: str, suffix: str = "") -> str:
        """The address in the first printed line starting with `prefix` (waits for it)."""
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if line.startswith(prefix):
                    return line.split(" at ", 1)[1].split(suffix or " ", 1)[0] + suffix
            assert self.proc.poll() is None, "\n".join(self.lines)
            time.sleep(0.1)
        raise AssertionError("serve-model did not start:\n" + "\n".join(self.lines))

    def stop(self, sig: signal.Signals) -> int:
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=60)
        if self.reader is not None:
            self.reader.join(timeout=10)  # the last lines printed are read
        return code


def start_server(cwd: Path, env: dict[str, str], *args: str) -> Server:
    full_env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", **env}
    proc = subprocess.Popen(
        [sys.executable, "-m", "posttrain.cli.main", "serve-model", "port=0", *args],
        cwd=cwd,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    server = Server(proc)
    server.reader = threading.Thread(target=server.follow, daemon=True)
    server.reader.start()
    return server


@pytest.fixture(scope="module")
def served(finished) -> Iterator[tuple[Server, str]]:
    """`posttrain serve-model` of the trained run, and its /v1 address."""
    cwd, env = finished
    server = start_server(cwd, env)
    try:
        yield server, server.url(READY, "/v1")
    finally:
        if server.proc.poll() is None:
            server.stop(signal.SIGTERM)


def _client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)


def _sampler_path(cwd: Path) -> str:
    return json.loads((cwd / "results/summary.json").read_text())["checkpoint_path"]


def test_models_and_a_greedy_completion_are_the_engines_own(served, finished, engine_answer) -> None:
    _, base_url = served
    client = _client(base_url)
    assert [m.id for m in client.models.list()] == ["done"]
    assert client.models.retrieve("done").id == "done"
    reply = client.chat.completions.create(
        model="done", messages=CONVERSATION, temperature=0, max_tokens=ANSWER_TOKENS, n=2, seed=3
    )
    expected = engine_answer(_sampler_path(finished[0]), CONVERSATION, ANSWER_TOKENS)
    assert expected  # the trained model says something, so the comparison means something
    assert reply.object == "chat.completion" and reply.model == "done" and reply.id.startswith("chatcmpl-")
    assert [c.index for c in reply.choices] == [0, 1]
    for choice in reply.choices:
        assert choice.message.role == "assistant" and choice.message.content == expected
        assert choice.finish_reason in ("stop", "length")
    usage = reply.usage
    assert usage is not None and usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 2 * ANSWER_TOKENS
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_max_tokens_and_stop(served, finished, engine_answer) -> None:
    _, base_url = served
    client = _client(base_url)
    short = client.chat.completions.create(model="done", messages=CONVERSATION, temperature=0, max_tokens=1)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 1
    expected = engine_answer(_sampler_path(finished[0]), CONVERSATION, ANSWER_TOKENS)
    cut = expected[len(expected) // 2 :]  # the answer is cut where a stop string starts
    stopped = client.chat.completions.create(
        model="done", messages=CONVERSATION, temperature=0, max_tokens=ANSWER_TOKENS, stop=[cut]
    )
    assert stopped.choices[0].message.content == expected[: expected.index(cut)]
    assert stopped.choices[0].finish_reason == "stop"


def test_streaming_sends_openai_chunks_then_done(served, finished, engine_answer) -> None:
    _, base_url = served
    stream = _client(base_url).chat.completions.create(
        model="done",
        messages=CONVERSATION,
        temperature=0,
        max_tokens=ANSWER_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)  # the client reads up to `data: [DONE]` and stops there
    assert all(c.object == "chat.completion.chunk" and c.model == "done" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == engine_answer(_sampler_path(finished[0]), CONVERSATION, ANSWER_TOKENS)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert (
        chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    )
    with httpx.stream(
        "POST",
        f"{base_url}/chat/completions",
        json={"model": "done", "messages": CONVERSATION, "max_tokens": 2, "stream": True},
        timeout=120,
    ) as raw:
        assert raw.headers["content-type"].startswith("text/event-stream")
        events = [line for line in raw.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_unknown_model_is_404_and_a_bad_body_400_in_openais_shape(served) -> None:
    _, base_url = served
    client = _client(base_url)
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nope", messages=CONVERSATION)
    assert missing.value.status_code == 404 and missing.value.code == "model_not_found"
    assert "nope" in missing.value.message
    with pytest.raises(openai.BadRequestError) as empty:
        client.chat.completions.create(model="done", messages=[])
    assert empty.value.status_code == 400 and empty.value.param == "messages"
    for body in (
        b"{not json",
        json.dumps({"model": "done", "messages": [{"role": "user"}], "n": 0}).encode(),
    ):
        raw = httpx.post(
            f"{base_url}/chat/completions", content=body, headers={"content-type": "application/json"}
        )
        error = raw.json()["error"]
        assert raw.status_code == 400 and error["type"] == "invalid_request_error" and error["message"], (
            raw.text
        )


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_server_and_its_engine(finished, engine_answer, tiny_model: str, sig) -> None:
    cwd, env = finished
    server = start_server(cwd, env, "base=true")
    try:
        base_url = server.url(READY, "/v1")
        engine_url = server.url("engine: ready at ")
        client = _client(base_url)
        assert [m.id for m in client.models.list()] == [tiny_model]
        reply = client.chat.completions.create(
            model=tiny_model, messages=CONVERSATION, temperature=0, max_tokens=ANSWER_TOKENS
        )
        assert reply.choices[0].message.content == engine_answer(None, CONVERSATION, ANSWER_TOKENS)
    finally:
        code = server.stop(sig)
    assert code == 130, server.lines
    assert server.lines[-1] == "interrupted: serve-model stopped", server.lines
    host, port = engine_url.removeprefix("http://").rsplit(":", 1)
    with pytest.raises(OSError):  # the engine it started is gone
        socket.create_connection((host, int(port)), timeout=5).close()


def test_a_port_in_use_is_one_line(finished) -> None:
    cwd, env = finished
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = cli_here(["serve-model", f"port={port}"], cwd, env)
    assert proc.returncode == 2, proc.stderr
    expected = (
        f"error: port={port}: already in use on 127.0.0.1; stop what listens there, or pass another port="
    )
    assert proc.stderr.strip() == expected
