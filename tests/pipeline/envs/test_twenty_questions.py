"""env=game:twenty_questions: the cookbook's game with a served model as the answerer (`partner_model=`), end to
end on the local engine with the tiny models, plus its data format, its split and its bad settings."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from runs import FINISHED, REPO, read_jsonl, rl_results, train_here, without_guard

from posttrain.pipeline.envs.games import twenty_questions

FAST = [
    "renderer_name=role_colon",
    "batch_size=1",
    "group_size=2",
    "max_steps=1",
    "max_tokens=8",
    "max_eval_rows=2",
    "save_every=0",
    "eval_every=0",
    "lora_rank=4",
]


def _run(tmp_path: Path, url: str, model: str, args: list[str]) -> tuple[dict, list[dict], list[dict], str]:
    proc = train_here([*FAST, *args, f"model_name={model}", f"base_url={url}", "run_name=tq"], tmp_path)
    assert proc.returncode in FINISHED, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary, base, trained = rl_results(tmp_path / "results")
    return summary, base, trained, proc.stdout


def test_the_split_is_the_recipes_own():
    from tinker_cookbook.recipes.multiplayer_rl.twenty_questions.env import TwentyQuestionsDatasetBuilder

    builder = TwentyQuestionsDatasetBuilder(
        batch_size=1, model_name_for_tokenizer="x", renderer_name="role_colon", group_size=1
    )
    assert twenty_questions.cookbook_split() == builder._get_train_and_test_words()
    train_words, test_words = twenty_questions.cookbook_split()
    assert len(test_words) == 34 and not set(train_words) & set(test_words)


def _greedy_answer(url: str, model: str, secret: str, question: str) -> str:
    """What the answerer should say: the served model, greedy, shown the recipe's system prompt and the question."""
    import tinker
    from tinker_cookbook import renderers
    from tinker_cookbook.recipes.multiplayer_rl.twenty_questions.env import ANSWERER_SYSTEM_PROMPT
    from tinker_cookbook.tokenizer_utils import get_tokenizer

    renderer = renderers.get_renderer("role_colon", get_tokenizer(model))
    client = tinker.ServiceClient(base_url=url).create_sampling_client(base_model=model).result()
    convo = [
        {"role": "system", "content": ANSWERER_SYSTEM_PROMPT.format(answer=secret)},
        {"role": "user", "content": question},
    ]
    params = tinker.SamplingParams(max_tokens=5, temperature=0.0, stop=renderer.get_stop_sequences())
    result = client.sample(renderer.build_generation_prompt(convo), 1, params).result()
    return renderers.get_text_content(renderer.parse_response(result.sequences[0].tokens)[0])


def test_the_base_model_answers_and_every_turn_is_in_the_rows(tmp_path: Path, engine, tiny_model: str):
    summary, base, trained, stdout = _run(tmp_path, engine.url, tiny_model, ["env=game:twenty_questions"])
    assert "partner: " in stdout and "(the base model itself, never trained)" in stdout
    assert summary["score_label"] == "win rate" and summary["dataset"]["env"] == "game:twenty_questions"
    assert summary["partner_model"] == tiny_model and summary["partner_renderer"] == "role_colon"
    _, test_words = twenty_questions.cookbook_split()
    assert [r["ground_truth"] for r in base] == [r["ground_truth"] for r in trained]  # the same secrets
    assert all(r["ground_truth"] in test_words for r in base)
    for row in base + trained:
        turns = row["transcript"]
        # The tiny model never guesses right: every game runs the recipe's 20 questions.
        assert row["correct"] is False and len(turns) == 20 and row["details"]["questions"] == 20
        assert [t["turn"] for t in turns] == list(range(1, 21)) and set(turns[0]) == {
            "turn",
            "player",
            "env",
            "reward",
        }
        assert row["completion"].splitlines()[0] == turns[0]["player"].splitlines()[0]
    # The answers are the served partner's own greedy replies to each question.
    first = base[0]["transcript"][0]
    assert first["env"] == _greedy_answer(engine.url, tiny_model, base[0]["ground_truth"], first["player"])
    assert summary["game_play"]["base model"]["mean_questions"] == 20
    metrics = read_jsonl(tmp_path / summary["log_path"] / "metrics.jsonl")
    assert any("env/all/reward/total" in m for m in metrics)


def test_another_served_model_answers_secrets_from_the_users_data(
    tmp_path: Path, keyed_engine, tiny_model: str, tiny_model_b: str
):
    secrets = ["ice cream", "violin", "lighthouse", "penguin", "volcano", "castle", "bicycle", "comet"]
    data = tmp_path / "secrets.jsonl"
    data.write_text("".join(json.dumps({"secret": s}) + "\n" for s in secrets * 5))
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(json.dumps({"secret": s}) + "\n" for s in ("harbor", "tiger")))
    args = [f"dataset={data}", f"eval_dataset={held_out}", f"partner_model={tiny_model_b}"]
    summary, base, trained, stdout = _run(tmp_path, keyed_engine.url, tiny_model, args)
    # task=auto, from the data
    assert summary["method"] == "rl" and summary["dataset"]["env"] == "game:twenty_questions"
    assert summary["partner_model"] == tiny_model_b and f"partner: {tiny_model_b}," in stdout
    assert [r["ground_truth"] for r in base] == ["harbor", "tiger"]
    first = base[0]["transcript"][0]
    assert first["env"] == _greedy_answer(keyed_engine.url, tiny_model_b, "harbor", first["player"])
    problems = read_jsonl(tmp_path / summary["log_path"] / "data" / "train_problems.jsonl")
    assert {p["secret"] for p in problems} == set(secrets)


@pytest.mark.parametrize(
    ("args", "rows", "needle"),
    [
        (
            ["env=arithmetic", "partner_model=x"],
            None,
            "partner_model is only used by env=game:twenty_questions, not env=arithmetic",
        ),
        (
            ["env=game:twenty_questions", "partner_model=tinker://run/sampler_weights/1"],
            None,
            "the partner must be a model the backend serves by name",
        ),
        (
            ["env=game:twenty_questions"],
            [{"question": "1+1?", "answer": "2"}] * 20,
            'has question_answer rows; the game needs rows with a "secret" field',
        ),
        ([], [{"secret": "cat"}, {"secret": ""}], 'line 2: field "secret" is empty'),
        ([], [{"secret": "cat"}, {"secret": 3}], 'line 2: field "secret" must be a string'),
        (["task=sft"], [{"secret": "cat"}] * 20, "task=sft needs chat data"),
    ],
)
def test_bad_settings_and_rows_are_one_line_before_anything_starts(tmp_path: Path, args, rows, needle):
    if rows is not None:
        (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        args = [*args, f"dataset={tmp_path / 's.jsonl'}"]
    proc = train_here([*args, "backend=local", "model_name=HuggingFaceTB/SmolLM2-135M-Instruct"], tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert needle in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "results").exists()


def test_dry_run_plans_the_partners_tokens(tmp_path: Path, tiny_model: str):
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    args = ["env=game:twenty_questions", *FAST, f"model_name={tiny_model}", "backend=local", "dry_run=true"]
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *without_guard(args)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    plan = "\n".join(line for line in proc.stdout.splitlines() if line.startswith("plan: "))
    assert f"partner {tiny_model}: one reply of at most 5 tokens per turn" in plan, plan
    assert "every episode counted at 20 turns" in plan, plan
    # Its time counts the 20 turns of the training step's games and of each evaluation's, one after another.
    assert "time: 60 turns played one after another (20 a game;" in plan, plan
    assert re.search(r"a turn [\d.]+ s, 60 turns in a row[;)]", plan), plan
    assert not (tmp_path / "results").exists()


def test_a_game_needs_its_partner_served():
    from posttrain.pipeline.envs.base import EnvContext
    from posttrain.pipeline.envs.spec import EnvSpec
    from posttrain.pipeline.scoring.scorer import Scorer

    ctx = EnvContext(EnvSpec("game", "twenty_questions"), renderer=None, scorer=Scorer())  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="needs its answerer"):
        twenty_questions.TwentyQuestions().make_env({"secret": "cat"}, ctx)


def test_the_partner_is_served_beside_the_policy_with_thinking_off():
    from types import SimpleNamespace

    from posttrain.pipeline.methods.rl import RL, RLConfig

    said: list[str] = []

    def partnered(**settings):
        method = RL(RLConfig(env="game:twenty_questions", batch_size=2, **settings), None)
        ctx = SimpleNamespace(cfg=method.cfg, renderer_name="qwen3_instruct", say=said.append)
        return method, method.partner.settings(ctx)

    default, chosen = partnered()
    assert default.extra_models == () and chosen == {
        "partner_model": RLConfig().model_name,
        "partner_renderer_name": "qwen3_instruct",
    }
    assert "(the base model itself, never trained), greedy" in said[-1]
    # The recipe's own pairing: the answerer a larger Qwen3.5, which the engine (or Tinker) serves beside the
    # policy; its thinking is switched off, as the recipe does, since it answers in 5 tokens.
    qwen, chosen = partnered(partner_model="Qwen/Qwen3.5-9B")
    assert qwen.extra_models == ("Qwen/Qwen3.5-9B",)
    assert chosen == {"partner_model": "Qwen/Qwen3.5-9B", "partner_renderer_name": "qwen3_5_disable_thinking"}
    assert said[-1].startswith("partner: Qwen/Qwen3.5-9B, greedy, renderer qwen3_5_disable_thinking")
