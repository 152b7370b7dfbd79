"""`env=tools:NAME[:max_turns=N]`: multi-turn tool use, one environment for every tool set (`calculator`, `search`).

The model is given tools and a question; each turn it either calls a tool (the call is run and its result is
the next message) or answers; the episode ends at the answer, at a malformed call, or after `max_turns` turns
(default 4). The reward is the final answer's score (`scoring`, the same function as the evaluation's), with the
format term of the cookbook's `TextAnswerReward`: -0.1 when the answer is not written after '####'.

Everything tool-shaped is the cookbook's (`tinker_cookbook.tool_use`): the tools are `@tool` functions, the
env is `build_agent_tool_env` (its `AgentToolMessageEnv` runs the calls and ends the episode, inside the
token-level `EnvFromMessageEnv`), and the renderer writes the tool specifications and parses the calls. So the
tool-call format is the renderer's. For the default model (SmolLM2-135M-Instruct, rendered by `qwen3_instruct`,
whose ChatML is its chat template) that is Qwen's:

    <tool_call>
    {"name": "calculator", "arguments": {"expression": "24*37-15"}}
    </tool_call>

answered by a user turn `<tool_response>\\n873\\n</tool_response>`. A renderer without a tool-call format
(`role_colon`, `llama3` in tinker-cookbook 0.6.1) is refused before anything starts. A small model has never seen
the format, so every conversation opens with one worked example of it (the cookbook's search recipe puts one in
its instructions).
"""

from __future__ import annotations

import copy
import importlib
import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

from tinker_cookbook import renderers
from tinker_cookbook.renderers.base import ToolCall
from tinker_cookbook.rl.types import Env, EnvGroupBuilder
from tinker_cookbook.tool_use import build_agent_tool_env

from posttrain.config.renderers import resolve_renderer
from posttrain.errors import ConfigError
from posttrain.pipeline.envs.base import (
    EVAL_SEED_OFFSET,
    EnvContext,
    Environment,
    Episode,
    ProblemSet,
    mean_score,
    n_eval,
    n_train,
    problem_group,
)
from posttrain.pipeline.scoring.scorer import Scored, Scorer

if TYPE_CHECKING:
    from posttrain.pipeline.data import LoadedData
    from posttrain.pipeline.envs.base import ProblemSettings
    from posttrain.pipeline.envs.spec import EnvSpec
    from posttrain.pipeline.results import RLExample

# The cookbook's TextAnswerReward term: a final message without the answer marker loses this much (a
# malformed tool call, which ends the episode, costs the same).
FORMAT_COEF = 0.1
ANSWER_MARKER = "####"
DEFAULT_MAX_TURNS = 4
MAX_TURNS_LIMIT = 20
# Renderers of tinker-cookbook 0.6.1 whose `create_conversation_prefix_with_tools` raises NotImplementedError
# (a test pins this list to the cookbook); checked before the engine starts.
NO_TOOL_CALL_RENDERERS = ("llama3", "role_colon")


def tool_set(spec: EnvSpec) -> ModuleType:
    """`env=tools:NAME`'s tool set: the module `envs/tools/NAME.py`, with its TOOLS (cookbook `@tool` functions),
    INSTRUCTIONS, worked EXAMPLE, SOURCE and problems(split, n, seed); for tools that keep what an episode did,
    episode_tools(problem) (`EpisodeTools`); for a warm start (`methods.warm_start`), demonstration(problem): a
    worked answer's call arguments and the tool's reply. A new tool set is such a module and its line in
    `envs.registry`."""
    return importlib.import_module(f"{__package__}.{spec.variant}")


class EpisodeTools(Protocol):
    """One episode's own tools, which keep what they did for the results row (search: the passage ids)."""

    tools: list[Any]
    turn: Callable[[], int]  # the turn being played, set by the env that runs the tools

    def turn_details(self, turn: int) -> dict[str, Any]:
        """Fields added to turn `turn` of the row's transcript."""
        ...


def max_turns(spec: EnvSpec) -> int:
    """The `max_turns=N` option (the only one), checked."""
    unknown = set(spec.options) - {"max_turns"}
    if unknown:
        raise ConfigError(
            f"env={spec}: unknown option {sorted(unknown)[0]!r}; the only option is max_turns=N"
        )
    value = spec.options.get("max_turns", DEFAULT_MAX_TURNS)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_TURNS_LIMIT:
        raise ConfigError(f"env={spec}: max_turns={value!r} is not valid; expected 1 to {MAX_TURNS_LIMIT}")
    return value


def check_renderer(renderer_name: str, spec: EnvSpec) -> None:
    if renderer_name in NO_TOOL_CALL_RENDERERS:
        raise ConfigError(
            f"env={spec} needs a renderer with a tool-call format; renderer {renderer_name!r} has none "
            "(set renderer_name, e.g. qwen3_instruct for ChatML models)"
        )


def initial_messages(problem: dict, renderer: Any, tools: ModuleType) -> list[renderers.Message]:
    """System prompt with the tool specifications (the renderer's), the worked example, the question."""
    question, arguments, result, answer = tools.EXAMPLE
    try:
        prefix = renderer.create_conversation_prefix_with_tools(
            [t.to_spec() for t in tools.TOOLS], system_prompt=tools.INSTRUCTIONS
        )
    except NotImplementedError:
        raise ConfigError(
            f"env=tools:{tools.__name__.rsplit('.', 1)[-1]} needs a renderer with a tool-call format; "
            f"{type(renderer).__name__} has none (set renderer_name, e.g. qwen3_instruct for ChatML models)"
        ) from None
    example = [{"role": "user", "content": question}, *_worked(tools, arguments, result, answer)]
    return [*prefix, *example, {"role": "user", "content": problem["question"]}]


def _worked(tools: ModuleType, arguments: dict, result: str, answer: str) -> list[renderers.Message]:
    """One call of the tool set's first tool, its reply, and the answer after the marker."""
    first = tools.TOOLS[0]
    call = ToolCall(function=ToolCall.FunctionBody(name=first.name, arguments=json.dumps(arguments)))
    return [
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": result, "name": first.name},
        {"role": "assistant", "content": f"{ANSWER_MARKER} {answer}"},
    ]


def demonstration(problem: dict, renderer: Any, tools: ModuleType) -> list[renderers.Message] | None:
    """The episode's opening followed by a worked answer (the tool set's `demonstration`: the call and the tool's
    real reply), only its calls and answer marked trainable; None where the tool set has no worked answer for it."""
    worked = tools.demonstration(problem)
    if worked is None:
        return None
    arguments, result = worked
    opening = [{**m, "trainable": False} for m in initial_messages(problem, renderer, tools)]
    answer = _worked(tools, arguments, result, str(problem["answer"]))
    return [*opening, *({**m, "trainable": m["role"] == "assistant"} for m in answer)]  # type: ignore[misc]


# ------------------------------------------------------------------------------------------ reward, env


class ThreadSafeRenderer:
    """The renderer, with one copy of it (and of its tokenizer) per thread.

    The cookbook's `EnvFromMessageEnv` renders each turn in a worker thread, and concurrent rollouts share one
    renderer. The Qwen renderers encode with `split_special_tokens`, which makes transformers set a flag on the
    Rust tokenizer; while another thread is using that tokenizer this fails with `RuntimeError: Already
    borrowed` (seen in evaluation, 1 problem in 3). Each thread therefore renders with a tokenizer of its own,
    copied (about 0.5 s, once per thread) from a template no one renders with."""

    def __init__(self, renderer: renderers.Renderer):
        self._template = copy.deepcopy(renderer.tokenizer)
        self._renderer = renderer
        self._copies: dict[int, renderers.Renderer] = {}
        self._lock = threading.Lock()

    def own(self) -> renderers.Renderer:
        """This thread's renderer."""
        thread = threading.get_ident()
        mine = self._copies.get(thread)
        if mine is None:
            with self._lock:  # the template is only ever read, one copy at a time
                mine = copy.copy(self._renderer)
                mine.tokenizer = copy.deepcopy(self._template)
                self._copies[thread] = mine
        return mine

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # copy and pickle probe these before __init__ has run
            raise AttributeError(name)
        if callable(getattr(self._renderer, name)):
            # Looked up in one thread, called in another (`asyncio.to_thread(renderer.method, ...)`): the
            # copy is chosen when the method is called.
            return lambda *args, **kwargs: getattr(self.own(), name)(*args, **kwargs)
        return getattr(self.own(), name)

    def decode(self, tokens: list[int]) -> str:
        return self.own().tokenizer.decode(tokens, skip_special_tokens=True)


# One thread-safe wrapper per renderer for the whole run (by identity; the renderer is kept alive with it): its
# per-thread copies are made once, not once per episode.
_SHARED: dict[int, tuple[Any, ThreadSafeRenderer]] = {}


def thread_safe(renderer: renderers.Renderer | ThreadSafeRenderer) -> ThreadSafeRenderer:
    if isinstance(renderer, ThreadSafeRenderer):
        return renderer
    if id(renderer) not in _SHARED:
        _SHARED[id(renderer)] = (renderer, ThreadSafeRenderer(renderer))
    return _SHARED[id(renderer)][1]


@dataclass
class FinalAnswerReward:
    """The env's reward_fn, called once at the end of an episode: the last assistant message's score
    (`scoring`) plus the format term. Keeps what it scored, for the evaluation's rows."""

    problem: dict
    scorer: Scorer
    phase: str
    prompt_messages: int = 0  # the conversation's opening (the worked example has a call of its own)
    scored: Scored | None = None
    answer_text: str = ""
    metrics: dict[str, float] = field(default_factory=dict)

    async def __call__(self, history: list[renderers.Message]) -> tuple[float, dict[str, float]]:
        history = history[self.prompt_messages :]
        final = next((m for m in reversed(history) if m.get("role") == "assistant"), None)
        self.answer_text = renderers.get_text_content(final) if final is not None else ""
        self.scored = await self.scorer.score(self.problem, self.answer_text, self.phase)
        has_marker = float(ANSWER_MARKER in self.answer_text)
        calls = sum(len(m.get("tool_calls") or []) for m in history if m.get("role") == "assistant")
        self.metrics = {
            "correct": float(self.scored.correct),
            "score": self.scored.reward,
            "format": has_marker,
            "tool_calls": float(calls),
        }
        return FORMAT_COEF * (has_marker - 1) + self.scored.reward, self.metrics


def make_env(problem: dict, ctx: EnvContext) -> Env:
    """One rollout's env (the cookbook's tool-agent env); its reward function is kept on it as `answer`."""
    tools = tool_set(ctx.spec)
    renderer = thread_safe(ctx.renderer)
    opening = initial_messages(problem, renderer, tools)
    reward = FinalAnswerReward(problem, ctx.scorer, ctx.phase, prompt_messages=len(opening))
    own: EpisodeTools | None = tools.episode_tools(problem) if hasattr(tools, "episode_tools") else None
    env = build_agent_tool_env(
        renderer=renderer,  # type: ignore[arg-type]  # a Renderer in all but name
        tools=own.tools if own is not None else tools.TOOLS,
        initial_messages=opening,
        reward_fn=reward,
        max_turns=max_turns(ctx.spec),
        failed_parse_reward=-FORMAT_COEF,
    )
    if own is not None:
        # The env appends the model's message before it runs that message's calls: the count of the model's
        # messages so far (past the worked example) is the turn a call belongs to.
        messages = env.message_env
        own.turn = lambda: sum(m["role"] == "assistant" for m in messages.history[len(opening) :])  # type: ignore[attr-defined]
    env.answer = reward  # type: ignore[attr-defined]  # what the results row reads back
    env.episode_tools = own  # type: ignore[attr-defined]
    return env


class ToolUse(Environment):
    tag = "tools"
    score_label = "accuracy"
    noun = "problems"
    takes_verifier = True

    def problems(self, spec: EnvSpec, cfg: ProblemSettings, data: LoadedData | None) -> ProblemSet:
        corpus, retriever = getattr(cfg, "corpus", None), getattr(cfg, "retriever", None)
        if spec.variant != "search" and data is not None:
            raise ConfigError(f"env={spec} makes its own problems; leave dataset= out")
        # A renderer with no tool-call format is refused now, before the engine starts.
        check_renderer(resolve_renderer(cfg.model_name, cfg.renderer_name)[0], spec)
        turns, tools = max_turns(spec), tool_set(spec)
        if corpus is not None or data is not None:  # env=tools:search over the user's corpus
            path = Path(corpus).expanduser().resolve() if corpus is not None else None
            found = tools.user_problems(path, retriever or "chroma", data)
            return replace(found, info={**found.info, "max_turns": turns})
        eval_seed = cfg.seed + EVAL_SEED_OFFSET
        train, held_out = (
            tools.problems("train", n_train(cfg), cfg.seed),
            tools.problems("test", n_eval(cfg), eval_seed),
        )
        info = {
            "source": f"{spec.variant}: {tools.SOURCE}",
            "eval_source": f"{len(held_out)} held-out problems (seed {eval_seed})",
            "max_turns": turns,
            "score": "accuracy of the final answer (after the tool calls)",
        }
        if retriever is not None:  # the shipped corpus, searched another way than its default
            train, held_out = ([{**p, "retriever": retriever} for p in ps] for ps in (train, held_out))
            info["retriever"] = tools.describe(tools.retriever(None, retriever))
        return ProblemSet(train, held_out, info)

    def prompt(self, problem: dict, ctx: EnvContext) -> list[renderers.Message]:
        return initial_messages(problem, ctx.renderer, tool_set(ctx.spec))

    def max_turns(self, spec: EnvSpec) -> int:
        return max_turns(spec)

    def demonstrates(self, spec: EnvSpec) -> bool:
        """Whether the tool set can show a worked answer (`demonstration`), for a warm start."""
        return hasattr(tool_set(spec), "demonstration")

    def demonstration(self, problem: dict, ctx: EnvContext) -> list[renderers.Message] | None:
        return demonstration(problem, ctx.renderer, tool_set(ctx.spec))

    def make_env(self, problem: dict, ctx: EnvContext) -> Env:
        return make_env(problem, ctx)

    def group_builder(self, problem: dict, ctx: EnvContext, group_size: int) -> EnvGroupBuilder:
        # One thread-safe renderer for the whole run: its per-thread copies are made once.
        return problem_group(make_env, problem, ctx, group_size, self.tag)

    def row(self, index: int, problem: dict, episode: Episode) -> RLExample:
        """The transcript: per turn the model's text as written (tool calls included), the tools' replies ("" after
        the final answer) and the step's reward; the final answer scored as the training reward scores it."""
        from posttrain.pipeline.results import RLExample

        reward: FinalAnswerReward = episode.env.answer  # type: ignore[attr-defined]
        own: EpisodeTools | None = episode.env.episode_tools  # type: ignore[attr-defined]
        renderer = thread_safe(episode.renderer)
        transcript = [
            {
                "turn": turn,
                "player": renderer.decode(t.ac.tokens),
                "env": _tool_replies(t.logs),
                "reward": t.reward,
                **(own.turn_details(turn) if own is not None else {}),
            }
            for turn, t in enumerate(episode.trajectory.transitions, 1)
        ]
        record = RLExample(
            index, problem["question"], str(problem["answer"]), "", "", False, transcript=transcript
        )
        calls = sum(
            1 for t in episode.trajectory.transitions for key in t.logs if key.startswith("tool_call_")
        )
        record.details = {"tool_calls": calls, "turns": len(transcript)}
        scored = reward.scored  # None: the episode ended without an answer (a malformed or cut-off turn)
        record.completion = (
            reward.answer_text if scored is not None else (transcript[-1]["player"] if transcript else "")
        )
        if scored is not None:
            record.extracted_answer, record.correct = scored.extracted, scored.correct
            # A graded fraction (token F1 over the user's corpus) is the score, as for single-turn rows.
            record.reward = scored.reward if reward.scorer.verifier is not None or scored.details else None
            record.details |= scored.details
            record.verifier_error = scored.verifier_error
        return record

    def score(self, rows: Sequence[RLExample]) -> float:
        return mean_score(rows)


def _tool_replies(logs: dict[str, Any]) -> str:
    # AgentToolMessageEnv logs each call's result as tool_result_<k>, and malformed calls as parse_errors.
    replies = [str(logs[k]) for k in sorted(logs) if k.startswith("tool_result_")]
    if "parse_errors" in logs:
        replies.append(f"(tool call not understood: {logs['parse_errors']})")
    return "\n".join(replies)
