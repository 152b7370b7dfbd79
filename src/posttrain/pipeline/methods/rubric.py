"""RL against LLM-judged rubrics (`task=rubric`), through the cookbook's `rl.train` loop.

Rows: a conversation ending with the user's turn and rubric items (criteria, optionally weighted; see
`data_formats`). The policy writes the next reply, the grader (`grader_model=`, default the base model itself)
scores it against every item (`rubric`), and the reward is the weighted mean item score. Evaluation: one greedy
reply per held-out conversation, judged by the same grader, for the base and the trained model alike; the
score is the mean judged score. The scores are judgements, and the results say so: `score_kind: "judged"`, the
grader's name in the headline, each item's score and the grader's raw verdict in the rows.
"""

from __future__ import annotations

import math
from collections.abc import Coroutine, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from posttrain.config import TrainConfig
from posttrain.errors import ConfigError, DataError
from posttrain.pipeline.data import LoadedData
from posttrain.pipeline.methods.base import RunContext
from posttrain.pipeline.setup.plan import TokenBudget
from posttrain.util import write_jsonl

if TYPE_CHECKING:
    import tinker

    from posttrain.pipeline.envs.rubric import Grader

# The cookbook grader prompt's own words around the conversation, reply and criterion, in tokens (about 100
# with the SmolLM2 tokenizer).
GRADER_PROMPT_OVERHEAD = 100
# Per-example judged scores closer than this count as unchanged (summary.json `judged_per_example`).
SCORE_TOLERANCE = 0.01


class RubricRL:
    name: ClassVar[str] = "rubric"
    metric: ClassVar = "score"
    score_label: str = "rubric score"

    def __init__(self, cfg: TrainConfig, data: LoadedData | None):
        if cfg.env is not None:
            raise ConfigError(
                "env= does not apply to task=rubric: the rows and the grader make the environment"
            )
        if data is None or data.format != "rubric":
            found = f"{data.source} has {data.format} rows" if data is not None else "no dataset was given"
            raise DataError(
                f"task=rubric needs rows with a conversation and rubric items (messages + rubric); {found}"
            )
        self.grader_model = cfg.grader_model or cfg.model_name
        if self.grader_model.startswith("tinker://"):
            raise ConfigError(
                f"grader_model={self.grader_model}: the grader must be a model the backend serves by name, "
                "not a checkpoint (the judge is never a trained model)"
            )
        self.mode = cfg.grader_mode or "probability"
        self.data = data
        self.extra_models = [self.grader_model] if self.grader_model != cfg.model_name else []
        self.score_label = f"rubric score (judged by {self.grader_model})"
        self.scores: dict[str, list[float | None]] = {}
        self.grader_errors: dict[str, int] = {}
        self._grader: Grader | None = None

    def prepare(self, ctx: RunContext) -> None:
        from posttrain.pipeline.envs.rubric import RubricFileBuilder
        from posttrain.pipeline.setup import preflight

        self.ctx = ctx
        cfg = ctx.cfg
        rows_file = ctx.data_dir / "train_rubrics.jsonl"
        write_jsonl(rows_file, self.data.train)
        write_jsonl(ctx.data_dir / "eval_rubrics.jsonl", self.data.eval)
        if self.grader_model == cfg.model_name:
            self.grader_renderer, source = ctx.renderer_name, "the policy's"
        else:
            self.grader_renderer, source = preflight.resolve_renderer(self.grader_model, None)
        no_thinking = f"{self.grader_renderer}_disable_thinking"
        if self.mode == "probability" and preflight.renderer_exists(no_thinking):
            # P(Yes) is read at the reply's first token: a thinking grader would start with <think> there.
            self.grader_renderer, source = (
                no_thinking,
                f"{source}, thinking off: the reply starts with the answer",
            )
        same = " (the base model itself)" if self.grader_model == cfg.model_name else ""
        ctx.say(
            f"grader: {self.grader_model}{same}, {self.mode} scoring, renderer {self.grader_renderer} ({source})"
        )
        self.total_steps = cfg.max_steps or math.ceil(len(self.data.train) / cfg.batch_size) * cfg.num_epochs
        self.builder = RubricFileBuilder(
            rows_file=str(rows_file),
            model_name_for_tokenizer=cfg.model_name,
            renderer_name=ctx.renderer_name,
            groups_per_batch=cfg.batch_size,
            group_size=cfg.group_size,
            n_batches=self.total_steps,
            grader_model=self.grader_model,
            grader_renderer_name=self.grader_renderer,
            grader_mode=self.mode,
            grader_concurrency=cfg.eval_concurrency,
            base_url=ctx.base_url,
            seed=cfg.seed,
        )

    async def _get_grader(self) -> Grader:
        from posttrain.pipeline.envs.rubric import make_grader

        if self._grader is None:
            self._grader = await make_grader(
                self.ctx.service,
                self.grader_model,
                self.grader_renderer,
                self.mode,
                self.ctx.cfg.eval_concurrency,
            )
        return self._grader

    async def evaluate(self, client: tinker.SamplingClient, label: str) -> tuple[list[Any], float]:
        import tinker
        from tinker_cookbook import renderers

        from posttrain.pipeline.envs.rubric import rubric_text, weighted_score
        from posttrain.pipeline.evaluation.episodes import bounded_gather
        from posttrain.pipeline.results import RLExample
        from posttrain.util import short_error

        cfg, renderer = self.ctx.cfg, self.ctx.renderer
        grader = await self._get_grader()
        stop = renderer.get_stop_sequences()

        async def one(i: int, row: dict) -> RLExample:
            messages = row["messages"]
            record = RLExample(
                index=i,
                question="\n\n".join(f"{m['role']}: {m['content']}" for m in messages),
                ground_truth=rubric_text(row["rubric"]),
                completion="",
                extracted_answer="",
                correct=False,
            )
            try:
                params = tinker.SamplingParams(
                    max_tokens=cfg.max_tokens, temperature=cfg.eval_temperature, stop=stop, seed=cfg.seed + i
                )
                out = await client.sample_async(renderer.build_generation_prompt(messages), 1, params)
                response = renderers.get_text_content(renderer.parse_response(out.sequences[0].tokens)[0])
                record.completion = record.extracted_answer = response
                verdicts = await grader.judge(messages, response, row["rubric"])
                record.reward = weighted_score(verdicts)
                # "correct": the grader passes every item (score >= 0.5); the score itself is `reward`.
                record.correct = all(v.score >= 0.5 for v in verdicts)
                record.details = {
                    "score_kind": "judged",
                    "grader": self.grader_model,
                    "items": [v.as_dict() for v in verdicts],
                }
                errors = [v.error for v in verdicts if v.error]
                if errors:
                    record.error = f"{len(errors)} of {len(verdicts)} rubric items not judged: {errors[0]}"
            except Exception as exc:  # noqa: BLE001 - one bad example must not stop the evaluation
                record.error = short_error(exc)
            return record

        records = await bounded_gather(list(self.data.eval), one, cfg.eval_concurrency, label)
        if records and all(r.error for r in records):
            from posttrain.pipeline.evaluation.episodes import EvaluationFailed

            raise EvaluationFailed(
                f"evaluation of the {label} failed on all {len(records)} examples: {records[0].error}"
            )
        self.scores[label] = [None if r.error else r.reward for r in records]
        self.grader_errors[label] = sum(1 for r in records if r.error)
        # Like the other RL evaluations: an example that failed counts as 0.
        return records, sum((r.reward or 0.0) if not r.error else 0.0 for r in records) / len(records)

    def train(self) -> Coroutine[Any, Any, Any]:
        from tinker_cookbook.rl import train as rl_train

        config = rl_train.Config(
            **self.ctx.loop_settings(),
            **self.ctx.rl_settings(),
            recipe_name="posttrain_rubric",
            dataset_builder=self.builder,
        )
        return rl_train.main(config)

    def token_budget(self) -> TokenBudget:
        cfg, renderer = self.ctx.cfg, self.ctx.renderer
        rows = self.data.train[:200] + self.data.eval[:200]
        prompt = sum(renderer.build_generation_prompt(r["messages"]).length for r in rows) / len(rows)
        items = sum(len(r["rubric"]) for r in rows) / len(rows)
        # Each judgement reads the conversation, the reply and the criterion; probability scoring asks twice.
        per_item = (prompt + cfg.max_tokens + GRADER_PROMPT_OVERHEAD) * (
            2 if self.mode == "probability" else 1
        )
        rollouts = self.total_steps * cfg.batch_size * cfg.group_size
        evals = 2 * len(self.data.eval)
        grader_samples = (rollouts + evals) * items * (0 if self.mode == "probability" else 128)
        return TokenBudget(
            train=round(rollouts * (prompt + cfg.max_tokens)),
            prefill=round((rollouts + evals) * (prompt + items * per_item)),
            sample=round((rollouts + evals) * cfg.max_tokens + grader_samples),
            train_steps=self.total_steps,
            sequences_per_step=cfg.batch_size * cfg.group_size,
            mean_train_length=prompt + cfg.max_tokens,
            notes=[
                f"upper bound: every completion counted at max_tokens={cfg.max_tokens}",
                f"grader {self.grader_model}: {items:.1f} items per reply, {self.mode} scoring",
            ],
        )

    def score_text(self, value: float) -> str:
        return f"mean judged rubric score {value:.1%} on {len(self.data.eval)} held-out conversations (grader {self.grader_model})"

    def describe(self) -> tuple[Mapping[str, Any], Mapping[str, int], Mapping[str, Any]]:
        sizes = {
            "train_conversations": len(self.data.train),
            "eval_conversations": len(self.data.eval),
            "group_size": self.ctx.cfg.group_size,
        }
        dataset = {"source": self.data.source, "format": "rubric", "eval_source": self.data.eval_source}
        extra: dict[str, Any] = {
            "score_kind": "judged",
            "score_label": self.score_label,
            "score_note": (
                f"Scores are judged by {self.grader_model} ({self.mode} scoring), not verified: a judge can be "
                "wrong, and the policy is trained to please this judge."
            ),
            "grader_model": self.grader_model,
            "grader_mode": self.mode,
            "grader_renderer": self.grader_renderer,
            "grader_failed_examples": dict(self.grader_errors),
            "judged_per_example": self._per_example(),
        }
        return dataset, sizes, extra

    def _per_example(self) -> dict[str, Any] | None:
        """Improved/regressed/unchanged by the judged score itself (the shared count flips `correct`, which a
        graded score rarely does). None when the base evaluation was not run here (a resumed run)."""
        base, trained = self.scores.get("base model"), self.scores.get("trained model")
        if base is None or trained is None:
            return None
        pairs = [(b, t) for b, t in zip(base, trained, strict=False) if b is not None and t is not None]
        return {
            "improved": sum(1 for b, t in pairs if t - b > SCORE_TOLERANCE),
            "regressed": sum(1 for b, t in pairs if b - t > SCORE_TOLERANCE),
            "unchanged": sum(1 for b, t in pairs if abs(t - b) <= SCORE_TOLERANCE),
            "tolerance": SCORE_TOLERANCE,
        }
