"""`task=rubric`: conversations whose next reply is judged against rubric items (`scoring.judge`).

Rows: a conversation ending with the user's turn and rubric items (criteria, optionally weighted; see
`data.formats`). The policy writes the next reply, the judge (`grader_model=`, default the base model itself)
scores it against every item, and the reward is the weighted mean item score minus the cookbook's format penalty.
The cookbook's `RubricGradedEnv` is not reused as is: it takes a sampled-text grader and an unweighted mean, and
keeps the verdicts only in its log tree; `RubricEnv` mirrors its reward. The scores are judgements, and the
results say so: `score_kind: "judged"`, each item's score and the judge's raw verdict in the rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import tinker
from tinker_cookbook import renderers
from tinker_cookbook.rl.types import Action, ActionExtra, Env, EnvGroupBuilder, StepResult

from posttrain.errors import DataError
from posttrain.pipeline.envs.base import EnvContext, Environment, Episode, ProblemSet, problem_group
from posttrain.pipeline.scoring.judge import ItemVerdict, rubric_text, weighted_score

if TYPE_CHECKING:
    from posttrain.pipeline.data import LoadedData
    from posttrain.pipeline.envs.base import ProblemSettings
    from posttrain.pipeline.envs.spec import EnvSpec
    from posttrain.pipeline.results import RLExample

# Per-example judged scores closer than this count as unchanged (summary.json `judged_per_example`).
SCORE_TOLERANCE = 0.01


class RubricEnv(Env):
    """One conversation: the policy writes the next reply, the grader scores it against every item. The reward
    is the weighted mean item score minus the cookbook's format penalty (a reply cut off by max_tokens)."""

    def __init__(self, row: dict, ctx: EnvContext, format_coef: float = 0.1):
        assert ctx.judge is not None, "a rubric environment is judged: its context needs a judge"
        self.row, self.renderer, self.judge = row, ctx.renderer, ctx.judge
        self.format_coef = format_coef
        self.response = ""
        self.verdicts: list[ItemVerdict] = []

    async def initial_observation(self) -> tuple[tinker.ModelInput, renderers.StopCondition]:
        return self.renderer.build_generation_prompt(self.row["messages"]), self.renderer.get_stop_sequences()

    async def step(self, action: Action, *, extra: ActionExtra | None = None) -> StepResult:
        message, termination = self.renderer.parse_response(action)
        self.response = response = renderers.get_text_content(message)
        self.verdicts = verdicts = await self.judge.judge(self.row["messages"], response, self.row["rubric"])
        score = weighted_score(verdicts)
        well_formed = float(termination.is_stop_sequence)
        return StepResult(
            reward=self.format_coef * (well_formed - 1) + score,
            episode_done=True,
            next_observation=tinker.ModelInput.empty(),
            next_stop_condition=self.renderer.get_stop_sequences(),
            metrics={
                "format": well_formed,
                "rubric_score": score,
                "grader_error": float(any(v.error for v in verdicts)),
            },
        )


def make_env(row: dict, ctx: EnvContext) -> RubricEnv:
    return RubricEnv(row, ctx)


class RubricConversations(Environment):
    tag = "train"
    score_label = "rubric score"
    noun = "conversations"
    takes_verifier = False

    def problems(self, spec: EnvSpec, cfg: ProblemSettings, data: LoadedData | None) -> ProblemSet:
        if data is None or data.format != "rubric":
            found = f"{data.source} has {data.format} rows" if data is not None else "no dataset was given"
            raise DataError(
                f"task=rubric needs rows with a conversation and rubric items (messages + rubric); {found}"
            )
        info = {"source": data.source, "format": "rubric", "eval_source": data.eval_source}
        return ProblemSet(list(data.train), list(data.eval), info)

    def prompt(self, problem: dict, ctx: EnvContext) -> list[renderers.Message]:
        return problem["messages"]

    def max_turns(self, spec: EnvSpec) -> int:
        return 1

    def make_env(self, problem: dict, ctx: EnvContext) -> Env:
        return make_env(problem, ctx)

    def group_builder(self, problem: dict, ctx: EnvContext, group_size: int) -> EnvGroupBuilder:
        return problem_group(make_env, problem, ctx, group_size, self.tag)

    def row(self, index: int, problem: dict, episode: Episode) -> RLExample:
        """The judged score as the row's reward; `correct` when the judge passes every item (score >= 0.5)."""
        from posttrain.pipeline.results import RLExample

        env = episode.env
        assert isinstance(env, RubricEnv)
        messages = problem["messages"]
        question = "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)
        verdicts = env.verdicts
        record = RLExample(
            index,
            question,
            rubric_text(problem["rubric"]),
            env.response,
            env.response,
            all(v.score >= 0.5 for v in verdicts),
        )
        record.reward = weighted_score(verdicts)
        record.details = {
            "score_kind": "judged",
            "grader": env.judge.model,
            "items": [v.as_dict() for v in verdicts],
        }
        errors = [v.error for v in verdicts if v.error]
        if errors:
            record.error = f"{len(errors)} of {len(verdicts)} rubric items not judged: {errors[0]}"
        return record

    def score(self, rows: Sequence[RLExample]) -> float:
        # Like the other RL evaluations: an example that failed counts as 0.
        return (
            sum((r.reward or 0.0) if not r.error else 0.0 for r in rows) / len(rows) if rows else float("nan")
        )

    def summary(self, rows: dict[str, list[RLExample]]) -> dict[str, Any]:
        """Improved/regressed/unchanged by the judged score itself (the shared count compares `correct`, which a
        graded score rarely flips), and the examples the judge failed on, by model."""
        failed = {label: sum(1 for r in records if r.error) for label, records in rows.items()}
        base, trained = rows.get("base model"), rows.get("trained model")
        per_example = None
        if base is not None and trained is not None:
            pairs = [
                (b.reward, t.reward)
                for b, t in zip(base, trained, strict=False)
                if not b.error and not t.error and b.reward is not None and t.reward is not None
            ]
            per_example = {
                "improved": sum(1 for b, t in pairs if t - b > SCORE_TOLERANCE),
                "regressed": sum(1 for b, t in pairs if b - t > SCORE_TOLERANCE),
                "unchanged": sum(1 for b, t in pairs if abs(t - b) <= SCORE_TOLERANCE),
                "tolerance": SCORE_TOLERANCE,
            }
        return {"grader_failed_examples": failed, "judged_per_example": per_example}
