"""What a distillation run plans (tokens) and reports (summary.json): per teacher too, with several."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from posttrain.pipeline.methods.distillation import off_policy
from posttrain.pipeline.setup.plan import TokenBudget

if TYPE_CHECKING:
    from posttrain.pipeline.methods.base import RunContext
    from posttrain.pipeline.methods.distillation.held_out import HeldOut
    from posttrain.pipeline.methods.distillation.prompts import Prompts, Share
    from posttrain.pipeline.methods.distillation.teachers import TeacherPool


class Distillation(Protocol):
    """What the summary reads of a prepared, finished distillation run (`method.Distillation`)."""

    name: str
    ctx: RunContext
    mode: str
    teacher_model: str | None
    shares: tuple[Share, ...]
    prompts: Prompts
    total_steps: int
    pool: TeacherPool
    held_out: HeldOut
    task_accuracy: dict[str, float]
    trace_counts: dict[str, list[int]]


TRACES = ("teacher_train.jsonl", "teacher_eval.jsonl")


def token_budget(method: Distillation) -> TokenBudget:
    cfg, renderer, prompts = method.ctx.cfg, method.ctx.renderer, method.prompts
    sample = (prompts.train[:200] + prompts.eval[:200]) or [[{"role": "user", "content": ""}]]
    prompt = sum(renderer.build_generation_prompt(p).length for p in sample) / len(sample)
    full = prompt + cfg.max_tokens  # completions counted at max_tokens: an upper bound
    n_eval = len(prompts.eval)
    if method.mode == "on_policy":
        rollouts = method.total_steps * cfg.batch_size * cfg.group_size
        sampled, prefilled, trained = rollouts + n_eval, rollouts * full + n_eval * full, rollouts * full
        per_step = cfg.batch_size * cfg.group_size
    else:
        sampled = len(prompts.train) + n_eval  # the teacher's traces
        prefilled, trained, per_step = (
            sampled * prompt,
            method.total_steps * cfg.batch_size * full,
            cfg.batch_size,
        )
    return TokenBudget(
        train=round(trained),
        prefill=round(prefilled + 2 * n_eval * full),  # + the NLL of base and trained model
        sample=sampled * cfg.max_tokens,
        train_steps=method.total_steps,
        sequences_per_step=per_step,
        mean_train_length=full,
        notes=[f"upper bound: every completion counted at max_tokens={cfg.max_tokens}"],
    )


def describe(method: Distillation) -> tuple[Mapping[str, Any], Mapping[str, int], Mapping[str, Any]]:
    prompts, held_out = method.prompts, method.held_out
    dataset = {**prompts.source, "teacher_model": method.teacher_model, "distillation_mode": method.mode}
    if method.mode == "off_policy":  # a supervised loop on the traces: what it trains on
        dataset["train_on_what"] = str(off_policy.TRAIN_ON_WHAT[method.name])
    counts = {file: sum(method.trace_counts.get(file, [])) for file in TRACES}
    sizes = {
        "train_prompts": len(prompts.train),
        "eval_prompts": len(prompts.eval),
        "teacher_train_traces": counts["teacher_train.jsonl"],
        "teacher_eval_traces": counts["teacher_eval.jsonl"],
    }
    extra: dict[str, Any] = {"teacher_traces": str(method.ctx.data_dir)}
    if method.task_accuracy:
        extra.update(
            baseline_task_accuracy=method.task_accuracy.get("base model"),
            trained_task_accuracy=method.task_accuracy.get("trained model"),
            task_accuracy_definition=f"fraction of the {len(prompts.eval_problems)} gradable held-out prompts (an "
            "env's problems, rows with an answer) the student answers correctly, sampled at eval_temperature and "
            "graded as RL evaluation grades (rows: data/task_{base,trained}.jsonl)",
        )
    several = method.pool.several
    if held_out.kl:
        extra.update(
            baseline_reverse_kl=held_out.kl.get("base model"),
            trained_reverse_kl=held_out.kl.get("trained model"),
            reverse_kl_definition="per-token KL(student || teacher) on held-out prompts, estimated on one student "
            "sample per prompt at temperature 1"
            + (", each prompt against its own teacher, pooled over all teachers" if several else ""),
        )
    if several:
        extra["teachers"] = [_teacher(method, k) for k in range(len(method.shares))]
        on_policy = method.mode == "on_policy"
        pooled = "baseline_nll/trained_nll" + (
            " and baseline_reverse_kl/trained_reverse_kl" if on_policy else ""
        )
        extra["teachers_definition"] = (
            "per teacher, on its own dataset's held-out prompts: the NLL of its completions under the student"
            + (" and the reverse KL to it" if on_policy else "")
            + f"; {pooled} pool the held-out prompts of all teachers"
        )
    return dataset, sizes, extra


def _teacher(method: Distillation, k: int) -> dict[str, Any]:
    share, held_out = method.shares[k], method.held_out

    def traces_of(file: str) -> int:
        counts = method.trace_counts.get(file)
        return counts[k] if counts else 0

    entry: dict[str, Any] = {
        "teacher_model": share.teacher_model,
        "dataset": share.prompts.source.get("source"),
        "train_prompts": len(share.prompts.train),
        "eval_prompts": len(share.prompts.eval),
        "teacher_train_traces": traces_of("teacher_train.jsonl"),
        "teacher_eval_traces": traces_of("teacher_eval.jsonl"),
        "baseline_nll": held_out.measured(held_out.nll_by_teacher, "base model", k),
        "trained_nll": held_out.measured(held_out.nll_by_teacher, "trained model", k),
    }
    if method.mode == "on_policy":
        entry.update(
            baseline_reverse_kl=held_out.measured(held_out.kl_by_teacher, "base model", k),
            trained_reverse_kl=held_out.measured(held_out.kl_by_teacher, "trained model", k),
            prompts_per_step=method.per_step[k],
            training_metric=f"teacher_kl/dataset_{k}",
        )
    return entry
