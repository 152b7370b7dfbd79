"""Distillation from a teacher model (`teacher_model=`: a served model or a tinker:// checkpoint).

- off_policy: the teacher answers every prompt (concurrently); the traces are kept under the run's log folder
  (data/teacher_train.jsonl, data/teacher_eval.jsonl) and the student is trained on them with the cookbook's
  supervised loop.
- on_policy: the cookbook's `distillation.train_on_policy`: the student samples, the teacher scores the
  student's tokens, and the per-token reverse KL is the (negative) advantage.

Evaluation (both modes): the NLL of the teacher's completions of the held-out prompts under the student (SFT
rows). on_policy also measures the reverse KL to the teacher on the held-out prompts (summary.json).

Several teachers (`teacher_model=A,B dataset=a,b`), as the cookbook's multi-teacher recipe
(recipes/distillation/on_policy_multi_teacher.py) does: each teacher has its own prompt dataset (a `Share`).
on_policy: one `DistillationDatasetConfig` per teacher, every step takes a share of batch_size prompts from each
dataset, and the cookbook scores each sample with its own dataset's teacher (`teacher_kl/dataset_K` per
teacher). off_policy: each teacher answers its own prompts, the student is trained on all the traces. Each
teacher is evaluated on its own held-out prompts; the overall numbers pool every teacher's held-out prompts.

Teacher and student must render and tokenize alike: the teacher scores the student's token ids, and a
different tokenizer or chat format silently turns that into noise (tinker-cookbook #796). It is checked
before anything is trained.
"""

from __future__ import annotations

import math
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar

import chz
import numpy as np
import tinker
from tinker_cookbook import renderers
from tinker_cookbook.distillation import train_on_policy
from tinker_cookbook.distillation.datasets import (
    DistillationDatasetConfig,
    PromptOnlyEnv,
    TeacherConfig,
)
from tinker_cookbook.renderers import TrainOnWhat
from tinker_cookbook.rl.problem_env import ProblemGroupBuilder
from tinker_cookbook.rl.types import EnvGroupBuilder, RLDataset
from tinker_cookbook.supervised import train as sl_train
from tinker_cookbook.supervised.data import conversation_to_datum
from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig
from tinker_cookbook.tokenizer_utils import get_tokenizer

from posttrain.config import TrainConfig, teacher_models
from posttrain.errors import ConfigError, DataError
from posttrain.pipeline.data import LoadedData
from posttrain.pipeline.data.chat import ConversationFilesBuilder
from posttrain.pipeline.data.formats import CHAT_FORMATS
from posttrain.pipeline.envs.dataset import RowsFileBuilder, prompt_messages
from posttrain.pipeline.envs.registry import load_problems
from posttrain.pipeline.evaluation.episodes import bounded_gather, evaluate_nll
from posttrain.pipeline.methods.base import RunContext
from posttrain.pipeline.scoring.grading import ANSWER_INSTRUCTION
from posttrain.pipeline.setup import preflight
from posttrain.pipeline.setup.plan import TokenBudget
from posttrain.util import short_error, write_jsonl

Messages = list[dict[str, str]]
# Strings whose encodings must agree between teacher and student tokenizers (words, digits, code, unicode).
TOKENIZER_PROBES = (
    "Hello, world!",
    "What is 12 + 30? #### 42",
    "def f(x):\n\treturn x**2",
    "naïve café 東京 🙂",
)
# The on-policy reverse-KL advantage weight (the cookbook recipe's default).
ON_POLICY_KL_COEF = 1.0


# --- prompts ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompts:
    train: list[Messages]
    eval: list[Messages]
    source: dict[str, Any]
    # The held-out prompts that can be graded (an env='s problems, rows with an `answer`), as RL problems.
    eval_problems: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class Share:
    """One teacher and the prompts it teaches on: its own dataset's training and held-out prompts."""

    teacher_model: str
    prompts: Prompts


def pooled(shares: Sequence[Share]) -> Prompts:
    """All teachers' prompts in one list, in teacher order (one teacher: its own)."""
    if len(shares) == 1:
        return shares[0].prompts
    return Prompts(
        [p for s in shares for p in s.prompts.train],
        [p for s in shares for p in s.prompts.eval],
        {
            "source": " + ".join(str(s.prompts.source.get("source", "env")) for s in shares),
            "sources": [s.prompts.source for s in shares],
        },
    )


def split_evenly(total: int, parts: int) -> list[int]:
    """`total` as `parts` near-equal integers, the larger ones first (9 over 2: [5, 4])."""
    return [total // parts + (k < total % parts) for k in range(parts)]


def prompt_of(row: dict, fmt: str) -> Messages:
    """The conversation a teacher answers: a row's messages before its final answer (the answer is dropped)."""
    if fmt in CHAT_FORMATS:
        messages = row["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return messages[:last]
    if fmt == "preference":
        return row["prompt"]
    return [{"role": "user", "content": row["question"]}]


def load_prompts(cfg: TrainConfig, data: LoadedData | None, task: str) -> Prompts:
    """Prompts from any dataset (its reference answers are ignored) or from an RL environment (env=)."""
    if data is None:  # env= given: the environment's problems, with the RL prompt
        problems = load_problems(cfg, None)
        return Prompts(
            [prompt_messages(p) for p in problems.train],
            [prompt_messages(p) for p in problems.eval],
            {**problems.info, "env": cfg.env},
            [p for p in problems.eval if "question" in p and "answer" in p],
        )
    train = [prompt_of(r, data.format) for r in data.train]
    held_out = [prompt_of(r, data.format) for r in data.eval]
    if not train or not held_out or not all(train + held_out):
        raise DataError(
            f"{data.source}: task={task} needs prompts to train on and held-out prompts to evaluate"
        )
    return Prompts(
        train,
        held_out,
        {"source": data.source, "format": data.format, "eval_source": data.eval_source},
        [g for r, p in zip(data.eval, held_out, strict=True) if (g := gradable(r, p))],
    )


def gradable(row: dict, prompt: Messages) -> dict | None:
    """A single-question row with an `answer` (e.g. pairs made from a verifiable task) as an RL problem whose
    prompt is exactly the held-out prompt (no answer instruction added); None otherwise."""
    answer = row.get("answer")
    if answer is None or str(answer).strip() == "" or len(prompt) != 1 or prompt[0]["role"] != "user":
        return None
    return {"question": prompt[0]["content"], "answer": str(answer), "instruction": ""}


def prompt_text(messages: Messages) -> str:
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)


# --- teacher ---------------------------------------------------------------------------------------


def check_same_tokenizer(student: str, teacher: str, student_renderer: str, teacher_renderer: str) -> None:
    """One-line ConfigError unless the teacher renders and tokenizes like the student (tinker-cookbook #796)."""
    if student_renderer != teacher_renderer:
        raise ConfigError(
            f"teacher_model {teacher} uses the {teacher_renderer} chat format but the student {student} uses "
            f"{student_renderer}; distillation needs the same renderer and tokenizer (tinker-cookbook #796)"
        )
    s_tok, t_tok = get_tokenizer(student), get_tokenizer(teacher)
    same = len(s_tok) == len(t_tok) and all(s_tok.encode(p) == t_tok.encode(p) for p in TOKENIZER_PROBES)
    if not same:
        raise ConfigError(
            f"teacher_model {teacher} has a different tokenizer from the student {student} (vocabulary "
            f"{len(t_tok)} vs {len(s_tok)} tokens, or other token ids); distillation needs the same renderer "
            "and tokenizer (tinker-cookbook #796)"
        )


@dataclass(frozen=True)
class Teacher:
    base_model: str
    checkpoint: str | None  # a tinker:// sampler path, or None for the base model itself
    system_prompt: str | None = None  # prompt distillation: the teacher sees it, the student does not

    def messages(self, prompt: Messages) -> Messages:
        if self.system_prompt is None:
            return prompt
        return [
            {"role": "system", "content": self.system_prompt},
            *(m for m in prompt if m["role"] != "system"),
        ]


async def resolve_teacher(ctx: RunContext, teacher_model: str) -> Teacher:
    """The teacher's base model and checkpoint; a tinker:// path is looked up on the service, and its
    renderer (from the run's metadata) and tokenizer checked against the student's."""
    if not teacher_model.startswith("tinker://"):
        return Teacher(teacher_model, None)
    rest = ctx.service.create_rest_client()
    try:
        run = await rest.get_training_run_by_tinker_path_async(teacher_model)
    except Exception as exc:  # noqa: BLE001 - unknown path, malformed path, service error: one line
        raise ConfigError(
            f"teacher_model {teacher_model}: cannot find this checkpoint ({short_error(exc)})"
        ) from None
    renderer = (run.user_metadata or {}).get("renderer_name") or preflight.resolve_renderer(
        run.base_model, None
    )[0]
    check_same_tokenizer(ctx.cfg.model_name, run.base_model, ctx.renderer_name, renderer)
    return Teacher(run.base_model, teacher_model)


async def teacher_client(ctx: RunContext, teacher: Teacher) -> tinker.SamplingClient:
    try:
        return await ctx.service.create_sampling_client_async(
            base_model=teacher.base_model, model_path=teacher.checkpoint
        )
    except Exception as exc:  # noqa: BLE001 - e.g. a checkpoint of a model this engine does not serve
        raise ConfigError(f"teacher {teacher.checkpoint or teacher.base_model}: {short_error(exc)}") from None


async def sample_completions(
    client: tinker.SamplingClient,
    renderer: renderers.Renderer,
    prompts: Sequence[Messages],
    cfg: TrainConfig,
    seed: int,
    desc: str,
    temperature: float | None = None,
) -> list[str]:
    """One completion per prompt (concurrent, progress bar), at `temperature` (None: cfg.temperature); ""
    where sampling failed."""
    stop = renderer.get_stop_sequences()
    temperature = cfg.temperature if temperature is None else temperature

    async def one(i: int, prompt: Messages) -> str:
        params = tinker.SamplingParams(
            max_tokens=cfg.max_tokens, temperature=temperature, stop=stop, seed=seed + i
        )
        try:
            out = await client.sample_async(renderer.build_generation_prompt(prompt), 1, params)
        except Exception:  # noqa: BLE001 - a failed prompt is dropped from the traces, not the run
            return ""
        return renderers.get_text_content(renderer.parse_response(out.sequences[0].tokens)[0]).strip()

    return await bounded_gather(list(prompts), one, cfg.eval_concurrency, desc)


def traces(prompts: Sequence[Messages], completions: Sequence[str]) -> list[dict]:
    """Conversations {"messages": prompt + teacher answer}, leaving out prompts the teacher left unanswered."""
    return [
        {"messages": [*p, {"role": "assistant", "content": c}]}
        for p, c in zip(prompts, completions, strict=True)
        if c
    ]


async def reverse_kl(
    student: tinker.SamplingClient,
    teacher: tinker.SamplingClient,
    renderer: renderers.Renderer,
    prompts: Sequence[Messages],
    cfg: TrainConfig,
    desc: str,
    seed_offset: int = 0,
) -> tuple[float, int]:
    """KL(student || teacher) on held-out prompts, estimated on the student's own samples (log p_student -
    log p_teacher at each sampled token): (the sum over all sampled tokens, their number), so that per-token
    means can be pooled over teachers. Prompt i samples with seed cfg.seed + seed_offset + i."""

    async def one(i: int, prompt: Messages) -> tuple[float, int]:
        model_input = renderer.build_generation_prompt(prompt)
        params = tinker.SamplingParams(
            max_tokens=cfg.max_tokens,
            temperature=1.0,
            stop=renderer.get_stop_sequences(),
            seed=cfg.seed + seed_offset + i,
        )
        try:
            seq = (await student.sample_async(model_input, 1, params)).sequences[0]
            if not seq.tokens or seq.logprobs is None:
                return 0.0, 0
            full = model_input
            for token in seq.tokens:
                full = full.append_int(token)
            teacher_lp = (await teacher.compute_logprobs_async(full))[-len(seq.tokens) :]
            diff = np.array(seq.logprobs, dtype=np.float64) - np.array(teacher_lp, dtype=np.float64)
            return float(diff.sum()), len(seq.tokens)
        except Exception:  # noqa: BLE001 - a failed prompt is left out of the estimate
            return 0.0, 0

    parts = await bounded_gather(list(prompts), one, cfg.eval_concurrency, f"{desc}: reverse KL")
    return sum(s for s, _ in parts), sum(n for _, n in parts)


def per_token(total: float, tokens: int | float) -> float:
    return total / tokens if tokens else float("nan")


# --- on-policy data ----------------------------------------------------------------------------------


class PromptListDataset(RLDataset):
    """The cookbook's reward-free `PromptOnlyEnv` over our prompts (earlier turns become its conversation
    prefix), `groups_per_batch` prompts per step."""

    def __init__(
        self,
        prompts: list[Messages],
        renderer: renderers.Renderer,
        groups_per_batch: int,
        group_size: int,
        dataset_name: str = "prompts",
    ):
        self.prompts, self.renderer = prompts, renderer
        self.groups_per_batch, self.group_size = groups_per_batch, group_size
        self.dataset_name = dataset_name  # the env/<name>/... metrics' tag

    def get_batch(self, index: int) -> Sequence[EnvGroupBuilder]:
        batch = self.prompts[index * self.groups_per_batch : (index + 1) * self.groups_per_batch]
        return [
            ProblemGroupBuilder(
                env_thunk=partial(
                    PromptOnlyEnv, p[-1]["content"], self.renderer, convo_prefix=p[:-1] or None
                ),
                num_envs=self.group_size,
                dataset_name=self.dataset_name,
            )
            for p in batch
        ]

    def __len__(self) -> int:
        return math.ceil(len(self.prompts) / self.groups_per_batch)


@chz.chz
class PromptFileBuilder(RowsFileBuilder):
    dataset_name: str = "prompts"

    async def __call__(self) -> tuple[PromptListDataset, None]:
        import random

        prompts = [r["prompt"] for r in self.rows()]
        rng = random.Random(self.seed)
        # Enough prompts for n_batches steps, cycling (reshuffled) through the file as needed.
        ordered: list[Messages] = []
        while len(ordered) < self.n_batches * self.groups_per_batch:
            ordered += rng.sample(prompts, len(prompts))
        dataset = PromptListDataset(
            ordered, self.renderer(), self.groups_per_batch, self.group_size, self.dataset_name
        )
        return dataset, None


# --- the method ----------------------------------------------------------------------------------------


class Distillation:
    name: ClassVar[str] = "distillation"
    metric: ClassVar = "nll"
    score_label: ClassVar[str] = "NLL of the teacher's completions"
    # One per teacher (set by __init__); prompt_distillation sets its one teacher and prompts itself.
    shares: tuple[Share, ...] = ()

    def __init__(self, cfg: TrainConfig, data: LoadedData | None):
        assert cfg.teacher_model is not None  # config.check_method_settings guarantees it
        self.mode = cfg.distillation_mode or "off_policy"
        self.teacher_model = cfg.teacher_model
        # One dataset per teacher (config.check_teachers), in the same order.
        datasets = [data, *data.others] if data is not None else [None]
        self.shares = tuple(
            Share(name, load_prompts(cfg, d, self.name))
            for name, d in zip(teacher_models(cfg), datasets, strict=True)
        )
        self.prompts = pooled(self.shares)
        # A named teacher must be served next to the student; a checkpoint's base model is looked up later.
        named = [s.teacher_model for s in self.shares if not s.teacher_model.startswith("tinker://")]
        self.extra_models = [t for t in named if t != cfg.model_name]
        if named:
            student_renderer, _ = preflight.resolve_renderer(cfg.model_name, cfg.renderer_name)
        for teacher in named:
            # An explicit renderer_name is the chat format of all; otherwise each model's recommended one.
            teacher_renderer = cfg.renderer_name or preflight.resolve_renderer(teacher, None)[0]
            check_same_tokenizer(cfg.model_name, teacher, student_renderer, teacher_renderer)
        self.kl: dict[str, float] = {}
        self.n_traces: dict[str, int] = {}
        self.task_accuracy: dict[str, float] = {}

    def teacher_shares(self) -> tuple[Share, ...]:
        return self.shares or (Share(self.teacher_model, self.prompts),)

    @property
    def several(self) -> bool:
        return len(self.teacher_shares()) > 1

    def prepare(self, ctx: RunContext) -> None:
        self.ctx = ctx
        cfg = ctx.cfg
        shares = self.teacher_shares()
        who = (
            f"{len(shares)} teachers, each on its own dataset"
            if self.several
            else f"teacher {self.teacher_model}"
        )
        ctx.say(f"distillation: {self.mode}, {who}")
        if self.mode == "on_policy":
            self.total_steps = (
                cfg.max_steps or math.ceil(len(self.prompts.train) / cfg.batch_size) * cfg.num_epochs
            )
        else:  # the supervised loop over the traces (a prompt the teacher leaves unanswered drops out)
            steps = len(self.prompts.train) // cfg.batch_size * cfg.num_epochs
            self.total_steps = min(steps, cfg.max_steps) if cfg.max_steps else steps
        # on_policy: each step's prompts from each teacher's dataset (the recipe's groups_per_batch).
        self.per_step = split_evenly(cfg.batch_size, len(shares))
        for k, share in enumerate(shares if self.several else ()):
            per_step = f", {self.per_step[k]} prompts per step" if self.mode == "on_policy" else ""
            ctx.say(
                f"distillation: teacher {k} {share.teacher_model}: {share.prompts.source.get('source')}, "
                f"{len(share.prompts.train)} training and {len(share.prompts.eval)} held-out prompts{per_step}"
            )
        self.eval_rows: list[dict] | None = None
        self.eval_share: list[int] = []  # the teacher of each held-out row
        self.eval_datums: list[tinker.Datum] = []
        self._teachers: dict[int, tuple[Teacher, tinker.SamplingClient]] = {}
        self.share_nll: dict[str, list[float]] = {}
        self.share_kl: dict[str, list[float]] = {}
        self.share_traces: dict[str, list[int]] = {}

    async def teacher(self) -> tuple[Teacher, tinker.SamplingClient]:
        """The (first) teacher; prompt_distillation replaces it by the base model with its system prompt."""
        return await self._resolve(0)

    async def teacher_of(self, k: int) -> tuple[Teacher, tinker.SamplingClient]:
        return await self.teacher() if k == 0 else await self._resolve(k)

    async def _resolve(self, k: int) -> tuple[Teacher, tinker.SamplingClient]:
        if k not in self._teachers:
            spec = await resolve_teacher(self.ctx, self.teacher_shares()[k].teacher_model)
            self._teachers[k] = spec, await teacher_client(self.ctx, spec)
        return self._teachers[k]

    async def _teacher_traces(self, split: str, seed: int, desc: str) -> tuple[list[dict], list[int]]:
        """Each teacher answers its own `split` ("train" or "eval") prompts; all traces go to
        data/teacher_{split}.jsonl (with several teachers each row names its `teacher`). Returns the rows and
        the teacher index of each."""
        rows: list[dict] = []
        owners: list[int] = []
        counts: list[int] = []
        offset = 0
        for k, share in enumerate(self.teacher_shares()):
            prompts = share.prompts.train if split == "train" else share.prompts.eval
            spec, client = await self.teacher_of(k)
            completions = await sample_completions(
                client,
                self.ctx.renderer,
                [spec.messages(p) for p in prompts],
                self.ctx.cfg,
                seed + offset,  # prompt i of teacher k: other seeds than any other teacher's prompts
                f"{desc} (teacher {k})" if self.several else desc,
            )
            offset += len(prompts)
            answered = traces(prompts, completions)
            if not answered:
                raise DataError(
                    f"the teacher {share.teacher_model} answered none of the {len(prompts)} prompts ({desc})"
                )
            if self.several:
                answered = [{**r, "teacher": share.teacher_model} for r in answered]
            rows += answered
            owners += [k] * len(answered)
            counts.append(len(answered))
        file = f"teacher_{split}.jsonl"
        write_jsonl(self.ctx.data_dir / file, rows)
        self.n_traces[file] = len(rows)
        self.share_traces[file] = counts
        return rows, owners

    async def _held_out(self) -> None:
        # Sampled on first use, i.e. before the base model is evaluated and before anything is trained.
        if self.eval_rows is None:
            for k in range(len(self.teacher_shares())):  # every teacher found and checked before any sampling
                await self.teacher_of(k)
            seed = self.ctx.cfg.seed + 1_000_003  # other samples than the training traces
            self.eval_rows, self.eval_share = await self._teacher_traces("eval", seed, "teacher: held-out")
            cfg = self.ctx.cfg
            self.eval_datums = [
                conversation_to_datum(
                    r["messages"], self.ctx.renderer, cfg.max_length, TrainOnWhat.LAST_ASSISTANT_MESSAGE
                )
                for r in self.eval_rows
            ]

    async def evaluate(self, client: tinker.SamplingClient, label: str) -> tuple[list[Any], float]:
        await self._held_out()
        assert self.eval_rows is not None
        rows, nll = await evaluate_nll(
            client, self.eval_datums, self.eval_rows, self.ctx.cfg.eval_concurrency, label
        )
        shares = self.teacher_shares()
        if self.several:
            for row, k in zip(rows, self.eval_share, strict=True):
                row.teacher = shares[k].teacher_model
            self.share_nll[label] = self._nll_per_teacher(rows)
        if self.mode == "on_policy":
            parts, offset = [], 0
            for k, share in enumerate(shares):
                _, teacher = await self.teacher_of(k)
                desc = f"{label} (teacher {k})" if self.several else label
                parts.append(
                    await reverse_kl(
                        client, teacher, self.ctx.renderer, share.prompts.eval, self.ctx.cfg, desc, offset
                    )
                )
                offset += len(share.prompts.eval)
            self.kl[label] = per_token(sum(t for t, _ in parts), sum(n for _, n in parts))
            self.share_kl[label] = [per_token(t, n) for t, n in parts]
        for k, share in enumerate(shares if self.several else ()):
            kl = f", reverse KL {self.share_kl[label][k]:.4f}" if self.mode == "on_policy" else ""
            self.ctx.say(
                f"{label}: teacher {k} {share.teacher_model}: held-out NLL {self.share_nll[label][k]:.4f}{kl}"
            )
        if self.prompts.eval_problems:
            await self._task_accuracy(client, label)
        return rows, nll

    async def _task_accuracy(self, client: tinker.SamplingClient, label: str) -> None:
        """Where the held-out prompts can be graded: the student's answers, sampled as RL evaluation does."""
        from posttrain.pipeline.evaluation.episodes import SamplingSettings, evaluate_accuracy

        cfg = self.ctx.cfg
        problems = self.prompts.eval_problems
        settings = SamplingSettings(cfg.max_tokens, cfg.eval_temperature, cfg.seed)
        records, accuracy = await evaluate_accuracy(
            client, problems, self.ctx.renderer, ANSWER_INSTRUCTION, settings, cfg.eval_concurrency, label
        )
        self.task_accuracy[label] = accuracy
        write_jsonl(self.ctx.data_dir / f"task_{label.split()[0]}.jsonl", (r.to_dict() for r in records))
        self.ctx.say(f"{label}: task accuracy {accuracy:.1%} on {len(problems)} gradable held-out prompts")

    def _nll_per_teacher(self, rows: Sequence[Any]) -> list[float]:
        """Each teacher's token-weighted mean NLL on its own held-out rows (as evaluate_nll pools them all)."""
        totals = [0.0] * len(self.teacher_shares())
        tokens = [0.0] * len(totals)
        for row, datum, k in zip(rows, self.eval_datums, self.eval_share, strict=True):
            if row.nll is None:
                continue
            weight = float(datum.loss_fn_inputs["weights"].to_numpy().sum())
            totals[k] += row.nll * weight
            tokens[k] += weight
        return [per_token(t, n) for t, n in zip(totals, tokens, strict=True)]

    def train(self) -> Coroutine[Any, Any, Any]:
        return self._train_off_policy() if self.mode == "off_policy" else self._train_on_policy()

    async def _train_off_policy(self) -> None:
        cfg = self.ctx.cfg
        await self._held_out()
        await self._teacher_traces("train", cfg.seed, "teacher: training prompts")
        builder = ConversationFilesBuilder(
            common_config=ChatDatasetBuilderCommonConfig(
                model_name_for_tokenizer=cfg.model_name,
                renderer_name=self.ctx.renderer_name,
                max_length=cfg.max_length,
                batch_size=cfg.batch_size,
                train_on_what=TrainOnWhat.LAST_ASSISTANT_MESSAGE,
            ),
            train_file=str(self.ctx.data_dir / "teacher_train.jsonl"),
            eval_file=str(self.ctx.data_dir / "teacher_eval.jsonl") if cfg.eval_every > 0 else None,
            shuffle_seed=cfg.seed,
        )
        config = sl_train.Config(
            **self.ctx.loop_settings(),
            recipe_name=f"posttrain_{self.name}_off_policy",
            dataset_builder=builder,
            lr_schedule=cfg.lr_schedule,
            num_epochs=cfg.num_epochs,
            max_steps=cfg.max_steps,
        )
        await sl_train.main(config)

    async def _train_on_policy(self) -> None:
        cfg = self.ctx.cfg
        n_batches = cfg.max_steps or math.ceil(len(self.prompts.train) / cfg.batch_size) * cfg.num_epochs
        dataset_configs = []
        for k, share in enumerate(self.teacher_shares()):
            spec, _ = await self.teacher_of(k)
            prompts_file = self.ctx.data_dir / (
                f"train_prompts_{k}.jsonl" if self.several else "train_prompts.jsonl"
            )
            write_jsonl(prompts_file, ({"prompt": p} for p in share.prompts.train))
            builder = PromptFileBuilder(
                rows_file=str(prompts_file),
                model_name_for_tokenizer=cfg.model_name,
                renderer_name=self.ctx.renderer_name,
                groups_per_batch=self.per_step[k],
                group_size=cfg.group_size,
                n_batches=n_batches,
                seed=cfg.seed + k,
                dataset_name=f"teacher_{k}" if self.several else "prompts",
            )
            dataset_configs.append(
                DistillationDatasetConfig(
                    dataset_builder=builder,
                    teacher_config=TeacherConfig(
                        base_model=spec.base_model, load_checkpoint_path=spec.checkpoint
                    ),
                    groups_per_batch=self.per_step[k],
                )
            )
        config = train_on_policy.Config(
            **self.ctx.loop_settings(),
            recipe_name=f"posttrain_{self.name}_on_policy",
            dataset_configs=dataset_configs,
            max_tokens=cfg.max_tokens,
            temperature=cfg.temperature,
            kl_penalty_coef=ON_POLICY_KL_COEF,
            loss_fn=cfg.loss_fn,
            max_steps=n_batches,
        )
        await train_on_policy.main(config)

    def token_budget(self) -> TokenBudget:
        cfg, renderer = self.ctx.cfg, self.ctx.renderer
        sample = (self.prompts.train[:200] + self.prompts.eval[:200]) or [[{"role": "user", "content": ""}]]
        prompt = sum(renderer.build_generation_prompt(p).length for p in sample) / len(sample)
        full = prompt + cfg.max_tokens  # completions counted at max_tokens: an upper bound
        n_eval = len(self.prompts.eval)
        if self.mode == "on_policy":
            rollouts = self.total_steps * cfg.batch_size * cfg.group_size
            sampled, prefilled, trained = rollouts + n_eval, rollouts * full + n_eval * full, rollouts * full
            per_step = cfg.batch_size * cfg.group_size
        else:
            sampled = len(self.prompts.train) + n_eval  # the teacher's traces
            prefilled = sampled * prompt
            trained = self.total_steps * cfg.batch_size * full
            per_step = cfg.batch_size
        return TokenBudget(
            train=round(trained),
            prefill=round(prefilled + 2 * n_eval * full),  # + the held-out NLL of base and trained model
            sample=sampled * cfg.max_tokens,
            train_steps=self.total_steps,
            sequences_per_step=per_step,
            mean_train_length=full,
            notes=[f"upper bound: every completion counted at max_tokens={cfg.max_tokens}"],
        )

    def score_text(self, value: float) -> str:
        text = f"held-out NLL of the teacher's completions {value:.4f} on {len(self.eval_rows or [])} prompts"
        return text

    def describe(self) -> tuple[Mapping[str, Any], Mapping[str, int], Mapping[str, Any]]:
        dataset = {**self.prompts.source, "teacher_model": self.teacher_model, "distillation_mode": self.mode}
        sizes = {
            "train_prompts": len(self.prompts.train),
            "eval_prompts": len(self.prompts.eval),
            "teacher_train_traces": self.n_traces.get("teacher_train.jsonl", 0),
            "teacher_eval_traces": self.n_traces.get("teacher_eval.jsonl", 0),
        }
        extra: dict[str, Any] = {"teacher_traces": str(self.ctx.data_dir)}
        if self.task_accuracy:
            extra.update(
                baseline_task_accuracy=self.task_accuracy.get("base model"),
                trained_task_accuracy=self.task_accuracy.get("trained model"),
                task_accuracy_definition=f"fraction of the {len(self.prompts.eval_problems)} gradable held-out "
                "prompts (an env's problems, rows with an answer) the student answers correctly, sampled at "
                "eval_temperature and graded as RL evaluation grades (rows: data/task_{base,trained}.jsonl)",
            )
        if self.kl:
            extra.update(
                baseline_reverse_kl=self.kl.get("base model"),
                trained_reverse_kl=self.kl.get("trained model"),
                reverse_kl_definition="per-token KL(student || teacher) on held-out prompts, estimated on one "
                "student sample per prompt at temperature 1"
                + (", each prompt against its own teacher, pooled over all teachers" if self.several else ""),
            )
        if self.several:
            extra["teachers"] = [self._describe_teacher(k) for k in range(len(self.teacher_shares()))]
            pooled_fields = "baseline_nll/trained_nll" + (
                " and baseline_reverse_kl/trained_reverse_kl" if self.mode == "on_policy" else ""
            )
            extra["teachers_definition"] = (
                "per teacher, on its own dataset's held-out prompts: the NLL of its completions under the "
                "student"
                + (" and the reverse KL to it" if self.mode == "on_policy" else "")
                + f"; {pooled_fields} pool the held-out prompts of all teachers"
            )
        return dataset, sizes, extra

    def _describe_teacher(self, k: int) -> dict[str, Any]:
        share = self.teacher_shares()[k]

        def traces_of(file: str) -> int:
            counts = self.share_traces.get(file)
            return counts[k] if counts else 0

        def measured(values: dict[str, list[float]], label: str) -> float | None:
            # None: not measured (a resumed run keeps the base rows, not the measures) or nothing scored.
            value = values[label][k] if label in values else None
            return value if value is not None and math.isfinite(value) else None

        entry: dict[str, Any] = {
            "teacher_model": share.teacher_model,
            "dataset": share.prompts.source.get("source"),
            "train_prompts": len(share.prompts.train),
            "eval_prompts": len(share.prompts.eval),
            "teacher_train_traces": traces_of("teacher_train.jsonl"),
            "teacher_eval_traces": traces_of("teacher_eval.jsonl"),
            "baseline_nll": measured(self.share_nll, "base model"),
            "trained_nll": measured(self.share_nll, "trained model"),
        }
        if self.mode == "on_policy":
            entry.update(
                baseline_reverse_kl=measured(self.share_kl, "base model"),
                trained_reverse_kl=measured(self.share_kl, "trained model"),
                prompts_per_step=self.per_step[k],
                training_metric=f"teacher_kl/dataset_{k}",
            )
        return entry
