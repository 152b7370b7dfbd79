"""`posttrain chat`: a conversation with a finished run's trained model in the terminal (or through a pipe).

Each line read is the user's next message; the model answers with the conversation so far, rendered with the
run's own renderer and sampled from its final weights through the same backend as the run. With `base=true` the
base model answers the same conversation beside it. `/reset` starts a new conversation; end with Ctrl-D.
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass, field
from typing import Any

import chz

from posttrain.errors import ConfigError
from posttrain.pipeline.after.finished import (
    FinishedRun,
    answer_text,
    find_run,
    renderer_for,
    sampler_for,
    service_for,
)
from posttrain.pipeline.console import CONSOLE
from posttrain.util import short_error

say = CONSOLE.say


@chz.chz
class ChatSettings:
    """posttrain chat: talk to a trained run's model (one message per line; /reset; Ctrl-D ends)."""

    run_name: str | None = chz.field(default=None, doc="the run (default: the latest in results_dir)")
    results_dir: str = chz.field(default="results", doc="where the run's results are")
    base: bool = chz.field(default=False, doc="also show the base model's answer to the same conversation")
    system: str | None = chz.field(default=None, doc="a system message at the start of each conversation")
    max_tokens: int = chz.field(default=256, doc="the longest answer, in tokens")
    temperature: float = chz.field(default=0.0, doc="sampling temperature (0: the most likely answer)")


@dataclass
class Speaker:
    """One model in the conversation, with its own history (its own answers, not the other model's)."""

    label: str
    sampler: Any
    messages: list[dict[str, Any]] = field(default_factory=list)


def chat(settings: ChatSettings) -> None:
    if settings.max_tokens < 1:
        raise ConfigError(f"max_tokens={settings.max_tokens}: must be at least 1")
    if settings.temperature < 0:
        raise ConfigError(f"temperature={settings.temperature}: must be 0 or more")
    run = find_run(settings.results_dir, settings.run_name)
    log_path = run.log_path / "chat"
    log_path.mkdir(parents=True, exist_ok=True)
    with CONSOLE.capture(log_path / "console.log"):
        asyncio.run(_session(run, settings, log_path))


async def _session(run: FinishedRun, settings: ChatSettings, log_path: Any) -> None:
    import tinker

    renderer = renderer_for(run)
    params = tinker.SamplingParams(
        max_tokens=settings.max_tokens, temperature=settings.temperature, stop=renderer.get_stop_sequences()
    )
    async with service_for(run, log_path, say) as url:
        service = tinker.ServiceClient(base_url=url)
        speakers = [Speaker("trained", await sampler_for(service, run))]
        if settings.base:
            speakers.append(Speaker("base", await sampler_for(service, run, base=True)))
        interactive = sys.stdin.isatty()
        say(
            f"chat: run {run.name} ({run.model}, {run.sampler_path}); one message per line, /reset, Ctrl-D ends"
        )
        while (line := await asyncio.to_thread(_read, interactive)) is not None:
            text = line.strip()
            if not text:
                continue
            if text == "/reset":
                for s in speakers:
                    s.messages.clear()
                say("chat: new conversation")
                continue
            if not interactive:
                say(f"you> {text}")
            for s in speakers:
                if not s.messages and settings.system:
                    s.messages.append({"role": "system", "content": settings.system})
                s.messages.append({"role": "user", "content": text})
            answers = await asyncio.gather(*(_answer(s, renderer, params) for s in speakers))
            for s, answer in zip(speakers, answers, strict=True):
                say(f"{s.label}> {answer}")


def _read(interactive: bool) -> str | None:
    if interactive:  # the prompt goes to the terminal: stdout itself is captured into the log meanwhile
        CONSOLE.stream.write("you> ")
        CONSOLE.stream.flush()
    return sys.stdin.readline() or None


async def _answer(speaker: Speaker, renderer: Any, params: Any) -> str:
    prompt = renderer.build_generation_prompt(speaker.messages)
    try:
        reply = await speaker.sampler.sample(prompt, num_samples=1, sampling_params=params)
    except Exception as exc:  # noqa: BLE001 - one failed answer is shown, the conversation goes on
        speaker.messages.pop()
        return f"[no answer: {short_error(exc, 200)}]"
    text = answer_text(renderer, reply.sequences[0].tokens)
    speaker.messages.append({"role": "assistant", "content": text})
    return text
