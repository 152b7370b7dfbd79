"""task=pairwise_rl: RL whose reward is a pairwise preference, the single-stage alternative to RLHF's reward model
(the cookbook's `preference/shorter` recipe, generalised to any preference model).

Each training prompt gets `group_size` answers; the cookbook's pairwise-preference environments
(`rl.preference_envs`, all pairs both ways) ask the preference model which answer of each pair it prefers, and an
answer's reward is its wins minus its losses. The preference model (`preference_model=`):
- `shorter` (the default): the shorter answer wins, by characters, as in the cookbook's recipe;
- `judge` (or `grader_model=` given): a judge model (`grader_model=`, default the base model itself; never trained)
  reads the conversation and the two answers labelled A and B; the preference is P(A) / (P(A) + P(B)) at its first
  answer token (`scoring.pairwise_judge`, the rubric judge's machinery and `rubric.Judging`). It is served beside
  the policy, and the scores are judged, not verified;
- `path/to/file.py:function`: the user's comparison, called like a `reward_fn` verifier (worker processes, a
  timeout, errors recorded in verifier_errors.jsonl and counted as a tie, never crashing the run):
  `function(row, completion)` with `row = {"prompt": [messages], "other": "<the answer it is compared with>"}`;
  it returns 1 when `completion` is better, 0 when it is worse, 0.5 for a tie (values in between allowed).

Evaluation (the same prompts, greedy, for both models): each held-out prompt's trained answer is compared with the
base model's answer by the same preference model, both orders; the score is the trained model's win rate (a win
1, a tie 0.5), which is 50% for the base model by definition. For `shorter`, the answers' mean length is reported
beside it (summary.json `answer_chars`). With the judge, each row holds its two verdicts (both orders).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import chz

from posttrain.config.checks import not_blank
from posttrain.config.run import RunSettings
from posttrain.errors import ConfigError
from posttrain.pipeline.data import LoadedData
from posttrain.pipeline.methods.base import Method, RunContext
from posttrain.pipeline.methods.distillation.prompts import Messages, load_prompts, prompt_text
from posttrain.pipeline.methods.options import (
    EvalSamplingOptions,
    RLLoopOptions,
    RolloutOptions,
    TemperatureOptions,
    VerifierOptions,
    rollout_settings,
)
from posttrain.pipeline.methods.pairwise_judging import PairwiseJudging
from posttrain.pipeline.methods.rubric import GraderOptions
from posttrain.pipeline.scoring import verifiers
from posttrain.pipeline.setup.plan import TokenBudget
from posttrain.util import short_error, write_jsonl

if TYPE_CHECKING:
    import tinker
    from tinker_cookbook.preference.types import Comparison

    from posttrain.pipeline.results import RLExample
    from posttrain.pipeline.scoring.pairwise_judge import PairwiseJudge

SHORTER = "shorter"
JUDGE = "judge"
BASE_LABEL = "base model"


@chz.chz
class PreferenceOptions:
    preference_model: str | None = chz.field(
        default=None,
        doc="task=pairwise_rl: which of two answers is better: shorter (the default; judge when grader_model is "
        "given), judge (a judge model, grader_model=; asked 'A or B?') or path/to/file.py:function (called like "
        "reward_fn with row={prompt, other}; returns 1 if the completion is better, 0 if worse)",
    )

    @staticmethod
    def check(cfg: Any) -> None:
        not_blank(cfg, "preference_model")
        spec = cfg.preference_model
        if spec is not None and spec not in (SHORTER, JUDGE) and ":" not in spec:
            raise ConfigError(
                f"preference_model={spec!r}: expected shorter, judge or path/to/file.py:function"
            )


@chz.chz
class PairwiseRLConfig(
    RunSettings,
    EvalSamplingOptions,
    TemperatureOptions,
    RolloutOptions,
    RLLoopOptions,
    PreferenceOptions,
    VerifierOptions,
    GraderOptions,
):
    """Every setting of task=pairwise_rl."""

    @staticmethod
    def when_chosen(cfg: Any) -> None:
        spec = cfg.preference_model
        if cfg.grader_model is not None and spec not in (None, JUDGE):
            raise ConfigError(
                f"grader_model does not apply to preference_model={spec}: it names the judge of "
                "preference_model=judge; leave one of them out"
            )


@dataclass(frozen=True)
class Outcome:
    """One comparison: `value` in [-1, 1], 1 when the first answer is preferred, -1 when the second is."""

    value: float
    verdict: str | None = None  # the judge's reading, "P(A)=0.41 P(B)=0.33"
    error: str | None = None


class Preference:
    """The run's preference model: `shorter`, the judge, or the user's function (in verifier worker processes)."""

    def __init__(
        self,
        spec: str,
        errors_file: str | None = None,
        timeout: float = verifiers.DEFAULT_TIMEOUT_S,
        judge: PairwiseJudge | None = None,
    ):
        self.spec = spec
        self.user = None
        self.judge = judge
        if spec == JUDGE and judge is None:
            raise ValueError("preference_model=judge needs its served judge")
        if spec not in (SHORTER, JUDGE):
            path = Path(errors_file) if errors_file else None
            self.user = verifiers.UserVerifier(spec, path, timeout, option="preference_model")

    async def __call__(self, prompt: Messages, a: str, b: str, phase: str) -> float:
        """In [-1, 1]: 1 when `a` is preferred, -1 when `b` is, 0 for a tie."""
        return (await self.compare(prompt, a, b, phase)).value

    async def compare(self, prompt: Messages, a: str, b: str, phase: str) -> Outcome:
        if self.judge is not None:
            verdict = await self.judge.compare(prompt, a, b)
            if verdict.error is not None:  # a tie, like a user function's error; the run goes on
                logging.getLogger("posttrain.judge").warning(
                    "pairwise judge (%s, a tie): %s", phase, verdict.error
                )
            return Outcome(2 * verdict.score - 1, verdict.verdict, verdict.error)
        if self.user is None:
            return Outcome(float((len(a) < len(b)) - (len(a) > len(b))))
        value, error = await self.user.score({"prompt": prompt, "other": b}, a, phase)
        return Outcome(0.0 if error is not None else 2 * value - 1, error=error)


@chz.chz
class PreferenceModelBuilder:
    """The cookbook's `PreferenceModelBuilder` for `rl.preference_envs`: a chz config, so the loop can log it."""

    spec: str
    errors_file: str | None = None
    timeout: float = verifiers.DEFAULT_TIMEOUT_S
    # preference_model=judge: the judge (a base model served at base_url) and how it is read.
    grader_model: str | None = None
    grader_renderer_name: str | None = None
    grader_concurrency: int = 64
    base_url: str | None = None

    async def preference(self, service: tinker.ServiceClient | None = None) -> Preference:
        """The preference model; the judge is reached through `service` (default: a client of base_url)."""
        judge = None
        if self.spec == JUDGE:
            import tinker

            from posttrain.pipeline.scoring.pairwise_judge import make_pairwise_judge

            assert self.grader_model is not None and self.grader_renderer_name is not None, (
                "a judge needs its model"
            )
            service = service or tinker.ServiceClient(base_url=self.base_url)
            judge = await make_pairwise_judge(
                service, self.grader_model, self.grader_renderer_name, self.grader_concurrency
            )
        return Preference(self.spec, self.errors_file, self.timeout, judge)

    def __call__(self) -> Any:
        from tinker_cookbook.preference.types import PreferenceModel
        from tinker_cookbook.utils import logtree

        builder = self
        # The cookbook calls this builder synchronously, inside its event loop: the judge's client, which is
        # created by awaiting, is made on the first comparison instead, once for every group.
        made = [] if self.spec == JUDGE else [Preference(self.spec, self.errors_file, self.timeout)]
        lock = asyncio.Lock()

        class Model(PreferenceModel):
            async def __call__(self, comparison: Comparison) -> float:
                async with lock:
                    if not made:
                        made.append(await builder.preference())
                a, b = (
                    " ".join(str(m["content"]) for m in c)
                    for c in (comparison.completion_A, comparison.completion_B)
                )
                outcome = await made[0].compare(comparison.prompt_conversation, a, b, "train")
                if outcome.verdict is not None:
                    # The judge's reading, in order before the cookbook's list of matchup rewards (iteration_*/
                    # train.html): what the reward was made of, as the evaluation rows keep it.
                    logtree.log_text(f"judge: {outcome.error or outcome.verdict}")
                # The cookbook's scale is the other way round: 1 when B is preferred, -1 when A is.
                return -outcome.value

        return Model()


class PairwiseRL(Method):
    name: ClassVar[str] = "pairwise_rl"
    metric: ClassVar = "score"
    extra_models: tuple[str, ...] = ()

    def __init__(self, cfg: PairwiseRLConfig, data: LoadedData | None):
        self.cfg = cfg
        self.spec = cfg.preference_model or (JUDGE if cfg.grader_model is not None else SHORTER)
        self.judging = PairwiseJudging.from_config(cfg) if self.spec == JUDGE else None
        if self.judging is not None:
            self.extra_models = self.judging.extra_models(cfg)  # served beside the policy
        elif self.spec != SHORTER:
            verifiers.load(self.spec, "preference_model")  # a missing file or function: one line now
        self.prompts = load_prompts(cfg, data, self.name)
        self.named = f"judged by {self.judging.model}" if self.judging is not None else self.spec
        self.score_label = f"win rate against the base model's answers ({self.named})"
        self.answers: dict[str, list[str]] = {}
        self.rows: dict[str, list[RLExample]] = {}
        self._preference: Preference | None = None

    def prepare(self, ctx: RunContext) -> None:
        self.ctx = ctx
        cfg = self.cfg
        self.errors_file = str(ctx.log_path / verifiers.ERRORS_FILE)
        # says which judge and renderer
        judge = self.judging.settings(ctx) if self.judging is not None else {}
        self.builder = PreferenceModelBuilder(
            spec=self.spec,
            errors_file=self.errors_file,
            timeout=cfg.verifier_timeout,
            grader_model=judge.get("grader_model"),
            grader_renderer_name=judge.get("grader_renderer_name"),
            grader_concurrency=cfg.eval_concurrency,
            base_url=ctx.base_url,
        )
        per_epoch = len(self.prompts.train) // cfg.batch_size
        self.total_steps = min(per_epoch * cfg.num_epochs, cfg.max_steps or math.inf)
        if self.total_steps < 1:
            raise ConfigError(
                f"batch_size={cfg.batch_size} is more than the {len(self.prompts.train)} training prompts"
            )
        # The cookbook's comparison rows; the environments read the prompt and ignore the two dummy answers.
        self.prompts_file = ctx.data_dir / "train_prompts.jsonl"
        write_jsonl(
            self.prompts_file, (_comparison(p) for _ in range(cfg.num_epochs) for p in self.prompts.train)
        )
        write_jsonl(ctx.data_dir / "eval_prompts.jsonl", ({"messages": p} for p in self.prompts.eval))
        ctx.say(
            f"pairwise_rl: preference model {self.named}; {len(self.prompts.train)} training prompts, "
            f"{len(self.prompts.eval)} held out"
        )

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
            preference_model_builder=self.builder,
            group_size=cfg.group_size,
            tournament_pattern=preference_envs.TournamentPattern.ALL_PAIRS_BOTH_WAYS,
        )
        settings = {**rollout_settings(cfg), "max_steps": self.total_steps}
        config = rl_train.Config(
            **self.ctx.loop_settings(),
            **settings,
            recipe_name="posttrain_pairwise_rl",
            dataset_builder=dataset,
        )
        return rl_train.main(config)

    async def evaluate(self, client: tinker.SamplingClient, label: str) -> tuple[list[Any], float]:
        from posttrain.pipeline.evaluation.common import bounded_gather, check_some_succeeded

        if self._preference is None:  # once: the judge is served for both models
            self._preference = await self.builder.preference(self.ctx.service)
        preference = self._preference
        answers = await self._answers(client, label)
        self.answers[label] = answers
        base = self.answers.get(BASE_LABEL)
        if base is None:  # a resumed run kept the base model's rows: its greedy answers are sampled again
            base = self.answers[BASE_LABEL] = await self._answers(
                await self.ctx.service.create_sampling_client(base_model=self.cfg.model_name),
                BASE_LABEL,
            )

        async def judge(i: int, prompt: Messages) -> RLExample:
            from posttrain.pipeline.results import RLExample

            mine, theirs = answers[i], base[i]
            if isinstance(mine, Exception) or isinstance(theirs, Exception):
                failed = mine if isinstance(mine, Exception) else theirs
                return RLExample(
                    i, prompt_text(prompt), str(theirs), str(mine), None, None, error=short_error(failed)
                )
            outcomes: list[Outcome] = []
            if label == BASE_LABEL:
                win = 0.5  # its own answers: a tie by definition
            else:
                outcomes = [
                    await preference.compare(prompt, mine, theirs, label),
                    await preference.compare(prompt, theirs, mine, label),
                ]
                win = 0.5 + (outcomes[0].value - outcomes[1].value) / 4
            row = RLExample(i, prompt_text(prompt), theirs, mine, None, win > 0.5, reward=win)
            row.details = {"chars": len(mine), "base_chars": len(theirs), "preference_model": self.spec}
            if self.judging is not None:
                row.details |= {"score_kind": "judged", "grader": self.judging.model}
                if outcomes:  # the judge's readings, the trained answer as A, then as B
                    row.details["verdicts"] = {
                        "trained_first": outcomes[0].verdict,
                        "base_first": outcomes[1].verdict,
                    }
                    errors = [o.error for o in outcomes if o.error]
                    if errors:
                        row.details["grader_errors"] = errors
            return row

        rows = await bounded_gather(
            self.prompts.eval, judge, self.cfg.eval_concurrency, f"{label}: comparing"
        )
        check_some_succeeded(rows, label)
        self.rows[label] = rows
        return rows, sum(r.reward or 0.0 for r in rows) / len(rows)  # a failed example counts as a loss

    async def _answers(self, client: tinker.SamplingClient, label: str) -> list[str | Exception]:
        import tinker
        from tinker_cookbook.renderers import get_text_content

        from posttrain.pipeline.evaluation.common import bounded_gather

        cfg, renderer = self.cfg, self.ctx.renderer
        params = tinker.SamplingParams(
            max_tokens=cfg.max_tokens,
            temperature=cfg.eval_temperature,
            stop=renderer.get_stop_sequences(),
            seed=cfg.seed,
        )

        async def answer(i: int, prompt: Messages) -> str | Exception:
            try:
                response = await client.sample(renderer.build_generation_prompt(prompt), 1, params)
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
        where = "" if self.judging else f"; the preference model {self.spec} runs here, not on the service"
        budget = TokenBudget(
            train=round(rollouts * (prompt + cfg.max_tokens)),
            prefill=round((rollouts + held_out) * prompt),
            sample=(rollouts + held_out) * cfg.max_tokens,
            train_steps=self.total_steps,
            sequences_per_step=cfg.batch_size * cfg.group_size,
            mean_train_length=prompt + cfg.max_tokens,
            notes=[f"answers counted at max_tokens={cfg.max_tokens} (upper bound){where}"],
        )
        if self.judging is None:
            return budget
        # Training compares each group as the cookbook does; the evaluation, each held-out pair both ways.
        comparisons = self.total_steps * cfg.batch_size * _comparisons_per_group(cfg.group_size) + held_out
        return self.judging.add_comparison_tokens(budget, comparisons, prompt, cfg.max_tokens)

    def score_text(self, value: float) -> str:
        return f"win rate {value:.1%} against the base model's answers ({self.named})"

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
        if self.judging is not None:
            extra |= self.judging.summary()
            extra["grader_failed_comparisons"] = {
                label: sum(len((r.details or {}).get("grader_errors", [])) for r in rows)
                for label, rows in self.rows.items()
            }
        elif self.spec != SHORTER:
            extra["verifier_errors"] = verifiers.summary(self.spec, Path(self.errors_file))["verifier_errors"]
        return {**self.prompts.source, "preference_model": self.spec}, sizes, extra


def _comparisons_per_group(group_size: int) -> int:
    """The preference model's calls for one group, as the cookbook's pairwise environments match it (every pair
    both ways, within chunks of its `matchup_group_size`)."""
    import dataclasses

    from tinker_cookbook.rl import preference_envs as envs

    chunk = next(
        f.default
        for f in dataclasses.fields(envs.PairwisePreferenceGroupBuilder)
        if f.name == "matchup_group_size"
    )
    return len(envs.get_pairs_chunked(group_size, envs.TournamentPattern.ALL_PAIRS_BOTH_WAYS, chunk))


def _comparison(prompt: Messages) -> dict:
    empty = [{"role": "assistant", "content": ""}]
    return {
        "comparison": {"prompt_conversation": prompt, "completion_A": empty, "completion_B": empty},
        "label": "Tie",
    }
