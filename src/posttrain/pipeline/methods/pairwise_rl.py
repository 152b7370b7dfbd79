"""task=pairwise_rl: RL whose reward is a pairwise preference, the single-stage alternative to RLHF's reward model
(the cookbook's `preference/shorter` recipe, generalised to any preference model).

Each training prompt gets `group_size` answers; the cookbook's pairwise-preference environments
(`rl.preference_envs`, all pairs both ways) ask the preference model which answer of each pair it prefers, and an
answer's reward is its wins minus its losses. The preference model (`preference_model=`):
- `shorter` (the default): the shorter answer wins, by characters, as in the cookbook's recipe;
- `path/to/file.py:function`: the user's comparison, called like a `reward_fn` verifier (worker processes, a
  timeout, errors recorded in verifier_errors.jsonl and counted as a tie, never crashing the run):
  `function(row, completion)` with `row = {"prompt": [messages], "other": "<the answer it is compared with>"}`;
  it returns 1 when `completion` is better, 0 when it is worse, 0.5 for a tie (values in between allowed).

Evaluation (the same prompts, greedy, for both models): each held-out prompt's trained answer is compared with the
base model's answer by the same preference model, both orders; the score is the trained model's win rate (a win
1, a tie 0.5), which is 50% for the base model by definition. For `shorter`, the answers' mean length is reported
beside it (summary.json `answer_chars`).
"""

from __future__ import annotations

import math
from collections.abc import Coroutine, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import chz

from posttrain.config.checks import not_blank
from posttrain.config.run import RunSettings
from posttrain.errors import ConfigError
from posttrain.pipeline.data import LoadedData
from posttrain.pipeline.methods.base import RunContext
from posttrain.pipeline.methods.distillation.prompts import Messages, load_prompts, prompt_text
from posttrain.pipeline.methods.rl import (
    EvalSamplingOptions,
    RLLoopOptions,
    RolloutOptions,
    TemperatureOptions,
    VerifierOptions,
    rollout_settings,
)
from posttrain.pipeline.scoring import verifiers
from posttrain.pipeline.setup.plan import TokenBudget
from posttrain.util import short_error, write_jsonl

if TYPE_CHECKING:
    import tinker
    from tinker_cookbook.preference.types import Comparison

    from posttrain.pipeline.results import RLExample

SHORTER = "shorter"
BASE_LABEL = "base model"


@chz.chz
class PreferenceOptions:
    preference_model: str | None = chz.field(
        default=None,
        doc="task=pairwise_rl: which of two answers is better: shorter (the default) or path/to/file.py:function "
        "(called like reward_fn with row={prompt, other}; returns 1 if the completion is better, 0 if worse)",
    )

    @staticmethod
    def check(cfg: Any) -> None:
        not_blank(cfg, "preference_model")
        spec = cfg.preference_model
        if spec is not None and spec != SHORTER and ":" not in spec:
            raise ConfigError(f"preference_model={spec!r}: expected shorter or path/to/file.py:function")


@chz.chz
class PairwiseRLConfig(
    RunSettings, EvalSamplingOptions, TemperatureOptions, RolloutOptions, RLLoopOptions, PreferenceOptions,
    VerifierOptions,
):
    """Every setting of task=pairwise_rl."""


class Preference:
    """The run's preference model: `shorter` or the user's function (in verifier worker processes)."""

    def __init__(self, spec: str, errors_file: str | None = None, timeout: float = verifiers.DEFAULT_TIMEOUT_S):
        self.spec = spec
        self.user = None
        if spec != SHORTER:
            path = Path(errors_file) if errors_file else None
            self.user = verifiers.UserVerifier(spec, path, timeout, option="preference_model")

    async def __call__(self, prompt: Messages, a: str, b: str, phase: str) -> float:
        """In [-1, 1]: 1 when `a` is preferred, -1 when `b` is, 0 for a tie."""
        if self.user is None:
            return float((len(a) < len(b)) - (len(a) > len(b)))
        value, error = await self.user.score({"prompt": prompt, "other": b}, a, phase)
        return 0.0 if error is not None else 2 * value - 1


@chz.chz
class PreferenceModelBuilder:
    """The cookbook's `PreferenceModelBuilder` for `rl.preference_envs`: a chz config, so the loop can log it."""

    spec: str
    errors_file: str | None = None
    timeout: float = verifiers.DEFAULT_TIMEOUT_S

    def __call__(self) -> Any:
        from tinker_cookbook.preference.types import PreferenceModel

        preference = Preference(self.spec, self.errors_file, self.timeout)

        class Model(PreferenceModel):
            async def __call__(self, comparison: Comparison) -> float:
                a, b = (" ".join(str(m["content"]) for m in c) for c in (comparison.completion_A, comparison.completion_B))
                # The cookbook's scale is the other way round: 1 when B is preferred, -1 when A is.
                return -await preference(comparison.prompt_conversation, a, b, "train")

        return Model()


class PairwiseRL:
    name: ClassVar[str] = "pairwise_rl"
    metric: ClassVar = "score"
    extra_models: tuple[str, ...] = ()

    def __init__(self, cfg: PairwiseRLConfig, data: LoadedData | None):
        self.cfg = cfg
        self.spec = cfg.preference_model or SHORTER
        if self.spec != SHORTER:
            verifiers.load(self.spec)  # a missing file or function: one line now
        self.prompts = load_prompts(cfg, data, self.name)
        self.score_label = f"win rate against the base model's answers ({self.spec})"
        self.answers: dict[str, list[str]] = {}

    def prepare(self, ctx: RunContext) -> None:
        self.ctx = ctx
        cfg = self.cfg
        self.errors_file = str(ctx.log_path / verifiers.ERRORS_FILE)
        self.preference = Preference(self.spec, self.errors_file, cfg.verifier_timeout)
        per_epoch = len(self.prompts.train) // cfg.batch_size
        self.total_steps = min(per_epoch * cfg.num_epochs, cfg.max_steps or math.inf)
        if self.total_steps < 1:
            raise ConfigError(f"batch_size={cfg.batch_size} is more than the {len(self.prompts.train)} training prompts")
        # The cookbook's comparison rows; the environments read the prompt and ignore the two dummy answers.
        self.prompts_file = ctx.data_dir / "train_prompts.jsonl"
        write_jsonl(self.prompts_file, (_comparison(p) for _ in range(cfg.num_epochs) for p in self.prompts.train))
        write_jsonl(ctx.data_dir / "eval_prompts.jsonl", ({"messages": p} for p in self.prompts.eval))
        ctx.say(f"pairwise_rl: preference model {self.spec}; {len(self.prompts.train)} training prompts, "
                f"{len(self.prompts.eval)} held out")  # fmt: skip

    def train(self) -> Coroutine[Any, Any, Any]:
        from tinker_cookbook.preference.preference_datasets import ComparisonBuilderFromJsonl
        from tinker_cookbook.rl import preference_envs
        from tinker_cookbook.rl import train as rl_train

        cfg = self.cfg
        dataset = preference_envs.PairwisePreferenceRLDatasetBuilder(
            comparison_builder=ComparisonBuilderFromJsonl(train_path=str(self.prompts_file)),
            batch_size=cfg.batch_size,
            policy_renderer_name=self.ctx.renderer_name,
            policy_model_name=cfg.model_name,
            preference_model_builder=PreferenceModelBuilder(spec=self.spec, errors_file=self.errors_file, timeout=cfg.verifier_timeout),
            group_size=cfg.group_size,
            tournament_pattern=preference_envs.TournamentPattern.ALL_PAIRS_BOTH_WAYS,
        )
        settings = {**rollout_settings(cfg), "max_steps": self.total_steps}
        config = rl_train.Config(**self.ctx.loop_settings(), **settings, recipe_name="posttrain_pairwise_rl",
                                 dataset_builder=dataset)  # fmt: skip
        return rl_train.main(config)

    async def evaluate(self, client: tinker.SamplingClient, label: str) -> tuple[list[Any], float]:
        from posttrain.pipeline.evaluation.common import bounded_gather, check_some_succeeded

        answers = await self._answers(client, label)
        self.answers[label] = answers
        base = self.answers.get(BASE_LABEL)
        if base is None:  # a resumed run kept the base model's rows: its greedy answers are sampled again
            base = self.answers[BASE_LABEL] = await self._answers(
                await self.ctx.service.create_sampling_client_async(base_model=self.cfg.model_name), BASE_LABEL
            )

        async def judge(i: int, prompt: Messages) -> RLExample:
            from posttrain.pipeline.results import RLExample

            mine, theirs = answers[i], base[i]
            if isinstance(mine, Exception) or isinstance(theirs, Exception):
                failed = mine if isinstance(mine, Exception) else theirs
                return RLExample(i, prompt_text(prompt), str(theirs), str(mine), None, None, error=short_error(failed))
            if label == BASE_LABEL:
                win = 0.5  # its own answers: a tie by definition
            else:
                forward = await self.preference(prompt, mine, theirs, label)
                backward = await self.preference(prompt, theirs, mine, label)
                win = 0.5 + (forward - backward) / 4
            row = RLExample(i, prompt_text(prompt), theirs, mine, None, win > 0.5, reward=win)
            row.details = {"chars": len(mine), "base_chars": len(theirs), "preference_model": self.spec}
            return row

        rows = await bounded_gather(self.prompts.eval, judge, self.cfg.eval_concurrency, f"{label}: comparing")
        check_some_succeeded(rows, label)
        return rows, sum(r.reward or 0.0 for r in rows) / len(rows)  # a failed example counts as a loss

    async def _answers(self, client: tinker.SamplingClient, label: str) -> list[str | Exception]:
        import tinker
        from tinker_cookbook.renderers import get_text_content

        from posttrain.pipeline.evaluation.common import bounded_gather

        cfg, renderer = self.cfg, self.ctx.renderer
        params = tinker.SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.eval_temperature,
                                       stop=renderer.get_stop_sequences(), seed=cfg.seed)  # fmt: skip

        async def answer(i: int, prompt: Messages) -> str | Exception:
            try:
                response = await client.sample_async(renderer.build_generation_prompt(prompt), 1, params)
            except Exception as exc:  # noqa: BLE001 - one failed example is recorded, not the end of the evaluation
                return exc
            return get_text_content(renderer.parse_response(response.sequences[0].tokens)[0])

        return await bounded_gather(self.prompts.eval, answer, cfg.eval_concurrency, label)

    def token_budget(self) -> TokenBudget:
        cfg, renderer = self.cfg, self.ctx.renderer
        prompts = self.prompts.train[:200]
        prompt = sum(renderer.build_generation_prompt(p).length for p in prompts) / max(len(prompts), 1)
        rollouts = self.total_steps * cfg.batch_size * cfg.group_size
        held_out = 2 * len(self.prompts.eval)
        return TokenBudget(
            train=round(rollouts * (prompt + cfg.max_tokens)),
            prefill=round((rollouts + held_out) * prompt),
            sample=(rollouts + held_out) * cfg.max_tokens,
            train_steps=self.total_steps,
            sequences_per_step=cfg.batch_size * cfg.group_size,
            mean_train_length=prompt + cfg.max_tokens,
            notes=[f"answers counted at max_tokens={cfg.max_tokens} (upper bound); the preference model "
                   f"{self.spec} runs here, not on the service"],
        )  # fmt: skip

    def score_text(self, value: float) -> str:
        return f"win rate {value:.1%} against the base model's answers ({self.spec})"

    def describe(self) -> tuple[Mapping[str, Any], Mapping[str, int], Mapping[str, Any]]:
        sizes = {"train_rows": len(self.prompts.train), "eval_rows": len(self.prompts.eval)}
        chars = {}
        for label, answers in self.answers.items():
            texts = [a for a in answers if isinstance(a, str)]
            chars[label.split()[0]] = sum(map(len, texts)) / len(texts) if texts else None
        extra: dict[str, Any] = {
            "preference_model": self.spec,
            "win_rate_definition": "each held-out prompt's trained answer against the base model's answer (greedy "
            "both), judged by the preference model in both orders: a win 1, a tie 0.5, a loss 0; the base model "
            "scores 0.5 by definition",
            "answer_chars": chars,
        }
        if self.spec != SHORTER:
            extra["verifier_errors"] = verifiers.summary(self.spec, Path(self.errors_file))["verifier_errors"]
        return {**self.prompts.source, "preference_model": self.spec}, sizes, extra


def _comparison(prompt: Messages) -> dict:
    empty = [{"role": "assistant", "content": ""}]
    return {"comparison": {"prompt_conversation": prompt, "completion_A": empty, "completion_B": empty}, "label": "Tie"}
