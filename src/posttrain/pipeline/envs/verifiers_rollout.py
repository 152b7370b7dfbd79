"""The rollout of `env=verifiers:NAME` (see `verifiers_env`): one `VerifiersEnv` is the cookbook `Env` of one
rollout, driven turn by turn by the cookbook's rollout loop. Kept apart from the loading (`verifiers_env`): this
module imports the Tinker SDK (and with it torch, seconds), which a refused environment never needs."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import tinker
from tinker_cookbook import renderers
from tinker_cookbook.rl.types import Action, ActionExtra, Env, StepResult


class _PolicyClient:
    """The OpenAI client the verifiers rollout calls: each chat request is passed out as the Env's next
    observation, and answered with the policy's sampled reply (put back by `VerifiersEnv.step`)."""

    def __init__(self) -> None:
        self.requests: asyncio.Queue[list[dict]] = asyncio.Queue()
        self.replies: asyncio.Queue[Any] = asyncio.Queue()
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self.create))

    async def create(self, *, messages: list[dict], model: str, **_: Any) -> Any:
        await self.requests.put(list(messages))
        return await self.replies.get()


class VerifiersEnv(Env):
    """One rollout of one verifiers problem, driven turn by turn by the cookbook's rollout loop. The reward comes
    at the end: the rubric's score; `state` is the finished verifiers State (its completion, reward, metrics)."""

    def __init__(self, vf_env: Any, problem: dict, renderer: renderers.Renderer):
        self.vf_env, self.problem, self.renderer = vf_env, problem, renderer
        self.client = _PolicyClient()
        self.task: asyncio.Task | None = None
        self.state: Any = None

    async def _run(self) -> Any:
        import verifiers as vf
        from verifiers.utils.async_utils import NullAsyncContext

        p = self.problem
        rollout_input = vf.RolloutInput(
            prompt=p["prompt"], answer=p["answer"], task=p["task"], info=p["info"], example_id=p["example_id"]
        )
        # Sampling is the cookbook's (max_tokens, temperature): the client ignores the rollout's sampling args.
        state = await self.vf_env.rollout(rollout_input, self.client, "policy", None)
        await self.vf_env.rubric.score_group([state], score_sem=NullAsyncContext())
        return state

    async def _next(self) -> list[dict] | None:
        """The rollout's next request (messages), or None when it has ended (then `state` is set)."""
        assert self.task is not None
        request = asyncio.ensure_future(self.client.requests.get())
        await asyncio.wait({request, self.task}, return_when=asyncio.FIRST_COMPLETED)
        if request.done():
            return request.result()
        request.cancel()
        self.state = self.task.result()  # the rollout's own exception, if it raised one
        return None

    async def initial_observation(self) -> tuple[tinker.ModelInput, renderers.StopCondition]:
        self.task = asyncio.create_task(self._run())
        messages = await self._next()
        if messages is None:
            error = self.state.get("error") if self.state is not None else None
            raise RuntimeError(f"the verifiers rollout ended before the model's first turn ({error!r})")
        return self.renderer.build_generation_prompt(messages), self.renderer.get_stop_sequences()  # type: ignore[arg-type]

    async def step(self, action: Action, *, extra: ActionExtra | None = None) -> StepResult:
        from openai.types.chat import ChatCompletion

        message, termination = self.renderer.parse_response(action)
        reply = ChatCompletion.model_validate(
            {
                "id": "policy",
                "object": "chat.completion",
                "created": 0,
                "model": "policy",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": renderers.get_text_content(message)},
                        "finish_reason": "stop" if termination.is_stop_sequence else "length",
                    }
                ],
            }
        )
        await self.client.replies.put(reply)
        messages = await self._next()
        stop = self.renderer.get_stop_sequences()
        if messages is not None:  # the environment answered: the model's next turn
            observation = self.renderer.build_generation_prompt(messages)  # type: ignore[arg-type]
            return StepResult(
                reward=0.0, episode_done=False, next_observation=observation, next_stop_condition=stop
            )
        metrics = {
            k: float(v) for k, v in (self.state.get("metrics") or {}).items() if isinstance(v, int | float)
        }
        return StepResult(
            reward=float(self.state.get("reward") or 0.0),
            episode_done=True,
            next_observation=tinker.ModelInput.empty(),
            next_stop_condition=stop,
            metrics={**metrics, "rollout_error": float(self.state.get("error") is not None)},
        )
