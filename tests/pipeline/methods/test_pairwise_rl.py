"""task=pairwise_rl end to end (the cookbook's pairwise-preference environments and rl.train through the real SDK on
the local engine with the tiny model): the built-in `shorter`, a user's preference function that crashes and hangs
(recorded, never stopping the run), a judge model (the tiny models: their verdicts are noise; what is checked is
the wiring: P(A)/(P(A)+P(B)) reaches the rewards and the rows, the judge is served and planned, the results say the
scores are judged), the held-out win rate against the base model's answers, and bad settings."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from runs import FINISHED, REPO, read_jsonl, rl_results, train_here, without_guard

FAST = [
    "renderer_name=role_colon",
    "lora_rank=4",
    "save_every=0",
    "eval_every=0",
    "batch_size=2",
    "group_size=4",
    "max_steps=2",
    "max_tokens=10",
    "max_eval_rows=4",
]

PREFERENCE = """
import time

def prefer(row, completion):
    asked = row["prompt"][-1]["content"]
    if "number 7." in asked:
        raise ValueError("no opinion on seven")
    if "number 3." in asked:
        time.sleep(10**6)
    return 1.0 if len(completion) < len(row["other"]) else 0.0 if len(completion) > len(row["other"]) else 0.5
"""


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    rows = [{"prompt": f"Say the number {i}.", "completion": f"Number {i}."} for i in range(40)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(
    tmp_path: Path, engine, model: str, prompts: Path, args: list[str]
) -> tuple[dict, list[dict], list[dict]]:
    proc = train_here(
        [f"dataset={prompts}", f"model_name={model}", f"base_url={engine.url}", "run_name=pw", *FAST, *args],
        tmp_path,
    )
    assert proc.returncode in FINISHED, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary, base, trained = rl_results(tmp_path / "results")
    return summary, base, trained


def test_shorter_answers_win_and_the_trained_model_is_compared_with_the_base_model(
    tmp_path: Path, engine, tiny_model: str, prompts: Path
):
    summary, base, trained = _run(tmp_path, engine, tiny_model, prompts, ["task=pairwise_rl"])
    assert summary["method"] == "pairwise_rl" and summary["preference_model"] == "shorter"
    assert summary["score_label"] == "win rate against the base model's answers (shorter)"
    assert summary["baseline_score"] == 0.5 and all(r["reward"] == 0.5 for r in base)  # itself: a tie
    # Each trained answer against the base answer to the same prompt, by length, both orders.
    for b, t in zip(base, trained, strict=True):
        assert t["question"] == b["question"] and t["ground_truth"] == b["completion"]
        shorter = (len(t["completion"]) < len(b["completion"])) - (
            len(t["completion"]) > len(b["completion"])
        )
        assert t["reward"] == 0.5 + shorter / 2 and t["details"]["chars"] == len(t["completion"])
    assert summary["trained_score"] == pytest.approx(sum(r["reward"] for r in trained) / len(trained))
    assert set(summary["answer_chars"]) == {"base", "trained"}
    log = tmp_path / summary["log_path"]
    assert len(read_jsonl(log / "data" / "train_prompts.jsonl")) == 36  # one epoch of the 36 training prompts
    steps = [m for m in read_jsonl(log / "metrics.jsonl") if "env/all/reward/total" in m]
    assert len(steps) == 2  # the cookbook's rl.train over its pairwise-preference environments


def test_a_preference_function_that_crashes_or_hangs_is_recorded_and_the_run_goes_on(
    tmp_path: Path, engine, tiny_model: str, prompts: Path
):
    (tmp_path / "prefer.py").write_text(PREFERENCE)
    args = ["preference_model=prefer.py:prefer", "verifier_timeout=1"]  # task=auto: chosen by the setting
    summary, _, trained = _run(tmp_path, engine, tiny_model, prompts, args)
    assert summary["method"] == "pairwise_rl" and summary["preference_model"] == "prefer.py:prefer"
    errors = summary["verifier_errors"]
    held_out = {r["question"] for r in trained}
    expected = sum(2 for q in held_out if q.endswith(("number 7.", "number 3.")))  # both orders
    assert errors["by_phase"].get("trained model", 0) == expected
    if errors["count"]:
        assert "prefer.py:" in errors["first"]
    log = (tmp_path / summary["log_path"] / "verifier_errors.jsonl").read_text()
    assert (
        log.count("prefer.py:7: ValueError: no opinion on seven") + log.count("timed out after 1 s")
        == errors["count"]
    )
    for row in trained:  # a failed comparison is a tie
        if row["question"].endswith(("number 7.", "number 3.")):
            assert row["reward"] == 0.5


def test_the_preference_reaches_the_cookbook_on_its_scale(tmp_path: Path):
    """The cookbook's PreferenceModel returns 1 when completion B is preferred and -1 when A is (its environments
    credit B with a positive value): the shorter answer must win there, in either position."""
    import asyncio

    from tinker_cookbook.preference.types import Comparison

    from posttrain.pipeline.methods.pairwise_rl import PreferenceModelBuilder

    (tmp_path / "prefer.py").write_text(PREFERENCE)
    prompt = [{"role": "user", "content": "Say the number 1."}]
    short, long = (
        [{"role": "assistant", "content": "One."}],
        [{"role": "assistant", "content": "The number one."}],
    )
    for spec in ("shorter", f"{tmp_path}/prefer.py:prefer"):
        model = PreferenceModelBuilder(spec=spec)()
        assert asyncio.run(model(Comparison(prompt, short, long))) == -1.0  # A, the shorter, preferred
        assert asyncio.run(model(Comparison(prompt, long, short))) == 1.0
        assert asyncio.run(model(Comparison(prompt, short, short))) == 0.0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["task=pairwise_rl", "preference_model=longer"],
            "preference_model='longer': expected shorter, judge or path/to/",
        ),
        (["task=pairwise_rl", "preference_model=missing.py:f"], "missing.py not found"),
        (
            ["task=sft", "preference_model=shorter"],
            "preference_model is only used by task=pairwise_rl, not task=sft; leave it out",
        ),
        (["task=pairwise_rl", "env=math"], "env is not used by task=pairwise_rl"),
        # The judge's settings: grader_model only names the judge of preference_model=judge.
        (
            ["task=pairwise_rl", "preference_model=shorter", "grader_model=x"],
            "grader_model does not apply to preference_model=shorter: it names the judge of preference_model=judge",
        ),
        (
            ["preference_model=prefer.py:f", "grader_model=x"],
            "grader_model does not apply to preference_model=prefer.py:f",
        ),
        (
            ["task=pairwise_rl", "grader_model=tinker://run/sampler_weights/1"],
            "the grader must be a model the backend serves",
        ),
        (
            ["task=pairwise_rl", "grader_mode=sampled"],
            "grader_mode is only used by task=rubric, not task=pairwise_rl",
        ),
        (
            ["task=sft", "grader_model=x"],
            "grader_model is not used by task=sft (only by task=rubric, pairwise_rl)",
        ),
    ],
)
def test_bad_pairwise_settings_are_one_line(tmp_path: Path, args: list[str], message: str):
    proc = train_here([*args, "backend=local"], tmp_path)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, (
        proc.stderr
    )


def test_a_missing_preference_function_is_refused_naming_preference_model(tmp_path: Path):
    # The user's function is loaded by the reward_fn= loader; the line must name the setting the user wrote.
    (tmp_path / "prefs.py").write_text("def prefer_digits(row, completion):\n    return 1.0\n")
    for spec, reason in (
        (f"{tmp_path}/nofile.py:f", f"file {tmp_path}/nofile.py not found"),
        (
            f"{tmp_path}/prefs.py:missing",
            f"{tmp_path}/prefs.py has no function 'missing' (functions there: prefer_digits)",
        ),
    ):
        proc = train_here(["task=pairwise_rl", f"preference_model={spec}", "backend=local"], tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr == f"error: preference_model={spec}: {reason}\n"


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"preference_model": "judge"}, ("pairwise_rl", "preference_model is set")),
        # grader_model alone means a rubric run; with a preference model it is pairwise RL's judge.
        ({"preference_model": "judge", "grader_model": "m"}, ("pairwise_rl", "preference_model is set")),
        ({"grader_model": "m"}, ("rubric", "grader_model is set")),
        ({"preference_model": "shorter"}, ("pairwise_rl", "preference_model is set")),
    ],
)
def test_task_auto_picks_pairwise_rl_for_a_preference_model_even_with_a_grader(
    settings: dict, expected: tuple
):
    from posttrain.pipeline.methods.choice import choose_task
    from posttrain.pipeline.settings import TrainConfig

    assert choose_task(TrainConfig(**settings), None) == expected


def _method(prompts: Path, **settings):
    from posttrain.pipeline.data import DataRequest, load_data
    from posttrain.pipeline.methods.pairwise_rl import PairwiseRL, PairwiseRLConfig

    data = load_data(DataRequest(str(prompts), max_train_rows=100, max_eval_rows=4, seed=42))
    return PairwiseRL(
        PairwiseRLConfig(batch_size=2, group_size=4, max_steps=2, max_tokens=10, **settings), data
    )


def test_the_judge_defaults_to_the_base_model_and_another_judge_is_served_beside_the_policy(prompts: Path):
    itself = _method(prompts, preference_model="judge")
    assert (
        itself.judging is not None
        and itself.judging.model == itself.cfg.model_name
        and itself.extra_models == ()
    )
    other = _method(prompts, grader_model="Qwen/Qwen3-8B")  # task=pairwise_rl grader_model=: the judge
    assert other.spec == "judge" and other.extra_models == ("Qwen/Qwen3-8B",)
    assert other.score_label == "win rate against the base model's answers (judged by Qwen/Qwen3-8B)"
    assert _method(prompts).judging is None and _method(prompts).extra_models == ()


def test_the_judge_reads_p_a_and_p_b_at_its_first_answer_token(engine, service, tiny_model: str):
    """The judge's prompt holds the conversation and both answers labelled A and B and ends asking for A or B; its
    verdict is P(A) / (P(A) + P(B)) for the reply's first token, the same numbers compute_logprobs gives."""
    import asyncio
    import math

    from posttrain.pipeline.methods.pairwise_rl import PreferenceModelBuilder
    from posttrain.pipeline.scoring.pairwise_judge import comparison_prompt

    convo = [{"role": "user", "content": "Say the number 1."}]
    prompt_messages = comparison_prompt(convo, "One.", "The number one.")
    text = prompt_messages[0]["content"]
    assert text.endswith("Which reply is better? Answer with A or B.")
    assert "Human: Say the number 1." in text and "<reply_A>\nChatbot: One.\n</reply_A>" in text
    assert "<reply_B>\nChatbot: The number one.\n</reply_B>" in text
    builder = PreferenceModelBuilder(spec="judge", grader_model=tiny_model, grader_renderer_name="role_colon")

    async def check() -> None:
        preference = await builder.preference(service)
        judge = preference.judge
        assert judge is not None
        verdict = await judge.compare(convo, "One.", "The number one.")
        renderer = judge.judge.renderer
        prompt = renderer.build_generation_prompt(prompt_messages)
        client = await service.create_sampling_client(base_model=tiny_model)
        p_a, p_b = [
            math.exp(
                (
                    await client.compute_logprobs(
                        prompt.append_int(renderer.tokenizer.encode(w, add_special_tokens=False)[0])
                    )
                )[-1]
            )
            for w in ("A", "B")
        ]
        assert verdict.error is None and verdict.score == pytest.approx(p_a / (p_a + p_b), rel=1e-4)
        assert verdict.verdict == f"P(A)={p_a:.4g} P(B)={p_b:.4g}"
        outcome = await preference.compare(convo, "One.", "The number one.", "test")
        assert outcome.value == pytest.approx(2 * verdict.score - 1) and outcome.verdict == verdict.verdict

    asyncio.run(check())


def _probabilities(verdict: str) -> float:
    p_a, p_b = map(float, re.fullmatch(r"P\(A\)=(\S+) P\(B\)=(\S+)", verdict).groups())
    return p_a / (p_a + p_b)


def test_a_judge_model_as_the_preference_model_served_beside_the_policy(
    tmp_path: Path, keyed_engine, tiny_model: str, tiny_model_b: str, prompts: Path
):
    # task=auto: the preference model chooses pairwise_rl, though grader_model alone would mean a rubric run.
    args = ["preference_model=judge", f"grader_model={tiny_model_b}"]
    summary, base, trained = _run(tmp_path, keyed_engine, tiny_model, prompts, args)
    assert summary["method"] == "pairwise_rl" and summary["preference_model"] == "judge"
    assert summary["grader_model"] == tiny_model_b and summary["grader_mode"] == "probability"
    assert summary["grader_renderer"] and "P(A) / (P(A) + P(B))" in summary["grader_scoring"]
    assert summary["score_kind"] == "judged" and "not verified" in summary["score_note"]
    assert summary["score_label"] == f"win rate against the base model's answers (judged by {tiny_model_b})"
    assert f"(judged by {tiny_model_b})" in summary["headline"]
    assert summary["grader_failed_comparisons"] == {"base model": 0, "trained model": 0}
    # itself: a tie, unjudged
    assert summary["baseline_score"] == 0.5 and all(r["reward"] == 0.5 for r in base)
    for row in trained:  # the judge's two readings make the reward: the trained answer as A, then as B
        assert row["details"]["score_kind"] == "judged" and row["details"]["grader"] == tiny_model_b
        verdicts = row["details"]["verdicts"]
        first, second = _probabilities(verdicts["trained_first"]), _probabilities(verdicts["base_first"])
        assert row["reward"] == pytest.approx(0.5 + (first - second) / 2, abs=1e-3)
        assert row["correct"] == (row["reward"] > 0.5)
    assert summary["trained_score"] == pytest.approx(sum(r["reward"] for r in trained) / len(trained))
    # Training: the cookbook's pairwise environments asked the judge about every pair both ways (12 matchups for
    # 4 answers); each matchup's reward is the judge's reading on the cookbook's scale, (P(B) - P(A)) / (P(A) + P(B)).
    log = tmp_path / summary["log_path"]
    steps = [m for m in read_jsonl(log / "metrics.jsonl") if "env/all/reward/total" in m]
    assert len(steps) == 2
    pages = sorted(log.glob("iteration_*/train.html"))
    assert len(pages) == 2
    for page in pages:
        text = page.read_text()
        readings = re.findall(r"judge: (P\(A\)=\S+ P\(B\)=\S+)<", text)
        rewards = [float(r) for r in re.findall(r"Matchup \d+: \(\d vs \d\) — Reward: (-?[0-9.]+)", text)]
        assert len(readings) == len(rewards) and len(rewards) % 12 == 0 and rewards, page
        for reading, reward in zip(readings, rewards, strict=True):
            assert reward == pytest.approx(1 - 2 * _probabilities(reading), abs=0.006)


def test_dry_run_serves_the_judge_and_plans_its_tokens(
    tmp_path: Path, tiny_model: str, tiny_model_b: str, prompts: Path
):
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    args = [
        "task=pairwise_rl",
        f"grader_model={tiny_model_b}",
        f"dataset={prompts}",
        f"model_name={tiny_model}",
        *FAST,
        "backend=local",
        "dry_run=true",
    ]
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *without_guard(args)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"grader: {tiny_model_b}, probability scoring" in proc.stdout, proc.stdout
    plan = "\n".join(line for line in proc.stdout.splitlines() if line.startswith("plan: "))
    # 2 steps x 2 prompts x 12 matchups (4 answers, every pair both ways) + 4 held-out prompts x 2 orders.
    assert (
        f"plan: grader {tiny_model_b}: 56 comparisons (every pair both ways), probability scoring" in plan
    ), plan
    assert "runs here, not on the service" not in plan
    assert not (tmp_path / "results").exists()


def test_the_plan_counts_two_judge_reads_per_comparison(tmp_path: Path, prompts: Path, tiny_model: str):
    from tinker_cookbook import renderers
    from tinker_cookbook.tokenizer_utils import get_tokenizer

    from posttrain.pipeline.methods.base import RunContext
    from posttrain.pipeline.scoring.pairwise_judge import PROMPT_OVERHEAD

    budgets = {}
    renderer = renderers.get_renderer("role_colon", tokenizer=get_tokenizer(tiny_model))
    for name, settings in {"judge": {"preference_model": "judge"}, "shorter": {}}.items():
        method = _method(prompts, model_name=tiny_model, **settings)
        ctx = RunContext(
            method.cfg, "plan", tmp_path / name, None, None, "role_colon", renderer, 1e-4, "", print
        )
        method.prepare(ctx)
        budgets[name] = method.token_budget()
    prompt = sum(renderer.build_generation_prompt(p).length for p in method.prompts.train) / 36
    # Each comparison reads the conversation and both answers (at max_tokens) twice: ending in A, then in B.
    per_comparison = 2 * (prompt + 2 * 10 + PROMPT_OVERHEAD + 1)
    assert budgets["judge"].prefill - budgets["shorter"].prefill == pytest.approx(56 * per_comparison, abs=1)
    assert (budgets["judge"].train, budgets["judge"].sample) == (
        budgets["shorter"].train,
        budgets["shorter"].sample,
    )
