"""The cookbook environment for multi-turn tool use (`env=tools:NAME`; problems and tools' logic in `tool_tasks`).

The model is given tools and a question; each turn it either calls a tool (the call is run and its result is
the next message) or answers; the episode ends at the answer, at a malformed call, or after `max_turns` turns.
The reward is the final answer's score (`scoring`, the same function as the evaluation's), with the format
term of the cookbook's `TextAnswerReward`: -0.1 when the answer is not written after '####'.

Everything tool-shaped is the cookbook's (`tinker_cookbook.tool_use`): the tools are `@tool` functions, the
env is `build_agent_tool_env` (its `AgentToolMessageEnv` runs the calls and ends the episode, inside the
token-level `EnvFromMessageEnv`), and the renderer writes the tool specifications and parses the calls. So the
tool-call format is the renderer's. For the default model (SmolLM2-135M-Instruct, rendered by `qwen3_instruct`,
whose ChatML is its chat template) that is Qwen's:

    <tool_call>
    {"name": "calculator", "arguments": {"expression": "24*37-15"}}
    </tool_call>

answered by a user turn `<tool_response>\\n873\\n</tool_response>`. SmolLM2's own template has no tool format,
and the renderer's is a documented, parseable one, so no protocol of our own is needed. A renderer without a
tool-call format (`role_colon`, `llama3` in tinker-cookbook 0.6.1) is refused before anything starts. A small
model has never seen the format, so every conversation opens with one worked example of it (the cookbook's
search recipe puts one in its instructions).
"""

from __future__ import annotations

import copy
import json
import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Annotated, Any

import chz
from tinker_cookbook import renderers
from tinker_cookbook.renderers.base import ToolCall
from tinker_cookbook.rl.problem_env import ProblemGroupBuilder
from tinker_cookbook.rl.types import Env, EnvGroupBuilder, RLDataset
from tinker_cookbook.tool_use import (
    Tool,
    ToolResult,
    build_agent_tool_env,
    error_tool_result,
    simple_tool_result,
    tool,
)

from posttrain.errors import ConfigError
from posttrain.pipeline.envs.dataset import ScoredRowsBuilder
from posttrain.pipeline.envs.tools import CalculatorError, corpus_retriever, format_number, safe_eval
from posttrain.pipeline.scoring.scorer import Scored, Scorer

# The cookbook's TextAnswerReward term: a final message without the answer marker loses this much (a
# malformed tool call, which ends the episode, costs the same).
FORMAT_COEF = 0.1
ANSWER_MARKER = "####"


# ------------------------------------------------------------------------------------------------ tools


@tool
async def calculator(expression: Annotated[str, "an arithmetic expression, e.g. 24*37-15"]) -> ToolResult:
    """Evaluate an arithmetic expression: numbers, + - * / // % ** and parentheses."""
    try:
        return simple_tool_result(format_number(safe_eval(expression)))
    except CalculatorError as exc:
        return error_tool_result(str(exc), error_type="calculator_error")


@tool
async def search(query: Annotated[str, "what to look for, e.g. a name from the question"]) -> ToolResult:
    """Search the encyclopedia; returns the passages that match the query best."""
    hits = corpus_retriever().search(query)
    return simple_tool_result("\n".join(p["text"] for p in hits) if hits else "No results.")


# Stateless tools, shared by every rollout (the cookbook README's "entire training run" lifetime).
TOOLS: dict[str, list[Tool]] = {"calculator": [calculator], "search": [search]}

# A worked example at the start of every conversation, in the renderer's own tool-call format: question, call
# arguments, the tool's answer, the final answer (made up: not from the problems or the corpus).
_EXAMPLES: dict[str, tuple[str, dict[str, str], str, str]] = {
    "calculator": (
        "A crate holds 24 jars. Ann has 37 crates and breaks 15 jars. How many jars are left?",
        {"expression": "24*37-15"},
        "873",
        "873",
    ),
    "search": (
        "Who built the Olvenmark Tower?",
        {"query": "Olvenmark Tower"},
        "The Olvenmark Tower is a stone tower by the sea. It was built in 1721 by Teodor Vlask.",
        "Teodor Vlask",
    ),
}
_INSTRUCTIONS = {
    "calculator": "Use the calculator tool for the arithmetic. Then give only the final answer after ####.",
    "search": "Search for the facts you need with the search tool. Then give only the final answer after ####.",
}


def initial_messages(problem: dict, renderer: Any) -> list[renderers.Message]:
    """System prompt with the tool specifications (the renderer's), the worked example, the question."""
    name = problem["tool_env"]
    tools = TOOLS[name]
    question, arguments, result, answer = _EXAMPLES[name]
    try:
        prefix = renderer.create_conversation_prefix_with_tools(
            [t.to_spec() for t in tools], system_prompt=_INSTRUCTIONS[name]
        )
    except NotImplementedError:
        raise ConfigError(
            f"env=tools:{name} needs a renderer with a tool-call format; {type(renderer).__name__} has none "
            "(set renderer_name, e.g. qwen3_instruct for ChatML models)"
        ) from None
    call = ToolCall(function=ToolCall.FunctionBody(name=tools[0].name, arguments=json.dumps(arguments)))
    example: list[renderers.Message] = [
        {"role": "user", "content": question},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": result, "name": tools[0].name},
        {"role": "assistant", "content": f"{ANSWER_MARKER} {answer}"},
    ]
    return [*prefix, *example, {"role": "user", "content": problem["question"]}]


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


def thread_safe(renderer: renderers.Renderer | ThreadSafeRenderer) -> ThreadSafeRenderer:
    return renderer if isinstance(renderer, ThreadSafeRenderer) else ThreadSafeRenderer(renderer)


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


def make_env(
    problem: dict,
    renderer: renderers.Renderer | ThreadSafeRenderer,
    scorer: Scorer,
    max_turns: int,
    phase: str = "train",
) -> tuple[Env, FinalAnswerReward]:
    """One rollout's env (the cookbook's tool-agent env) and its reward function."""
    renderer = thread_safe(renderer)  # type: ignore[assignment]  # a Renderer in all but name
    opening = initial_messages(problem, renderer)
    reward = FinalAnswerReward(problem, scorer, phase, prompt_messages=len(opening))
    env = build_agent_tool_env(
        renderer=renderer,
        tools=TOOLS[problem["tool_env"]],
        initial_messages=opening,
        reward_fn=reward,
        max_turns=max_turns,
        failed_parse_reward=-FORMAT_COEF,
    )
    return env, reward


# ---------------------------------------------------------------------------------------------- dataset


class ToolProblemDataset(RLDataset):
    """Groups of `group_size` rollouts per problem, the problems in a seeded order (batch i is the same on
    resume), epoch after epoch."""

    def __init__(
        self,
        problems: list[dict],
        renderer: renderers.Renderer | ThreadSafeRenderer,
        groups_per_batch: int,
        group_size: int,
        n_batches: int,
        seed: int,
        max_turns: int,
        scorer: Scorer,
    ):
        self.problems = problems
        self.renderer = thread_safe(renderer)  # one for the whole run: copies are made once per thread
        self.groups_per_batch = groups_per_batch
        self.group_size = group_size
        self.n_batches = n_batches
        self.seed = seed
        self.max_turns = max_turns
        self.scorer = scorer

    def _env(self, problem: dict) -> Env:
        return make_env(problem, self.renderer, self.scorer, self.max_turns)[0]

    def get_batch(self, index: int) -> Sequence[EnvGroupBuilder]:
        per_epoch = max(1, len(self.problems) // self.groups_per_batch)
        epoch, offset = divmod(index, per_epoch)
        order = list(range(len(self.problems)))
        random.Random(self.seed + epoch).shuffle(order)
        start = offset * self.groups_per_batch
        chosen = [order[(start + k) % len(order)] for k in range(self.groups_per_batch)]
        return [
            ProblemGroupBuilder(
                env_thunk=partial(self._env, self.problems[i]),  # type: ignore[arg-type]  # any Env works
                num_envs=self.group_size,
                dataset_name="tools",
            )
            for i in chosen
        ]

    def __len__(self) -> int:
        return self.n_batches


@chz.chz
class ToolProblemFileBuilder(ScoredRowsBuilder):
    """The dataset builder `rl.train` calls; the user's reward_fn, if any, scores the final answer."""

    max_turns: int = 4

    async def __call__(self) -> tuple[ToolProblemDataset, None]:
        dataset = ToolProblemDataset(
            self.rows(),
            self.renderer(),
            self.groups_per_batch,
            self.group_size,
            self.n_batches,
            self.seed,
            self.max_turns,
            self.scorer(),
        )
        return dataset, None
