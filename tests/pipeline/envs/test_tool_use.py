"""Multi-turn tool use (`env=tools:calculator`, `env=tools:search`): the safe calculator, the retriever and its
corpus, the cookbook env driven turn by turn with scripted answers, bad settings, and each environment end to
end as a user runs it (`train.py` against the session's engine with the tiny model)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from runs import FINISHED, REPO, read_jsonl, train_here

from posttrain.pipeline.envs.base import EVAL_SEED_OFFSET, EnvContext
from posttrain.pipeline.envs.spec import EnvSpec
from posttrain.pipeline.envs.tools import agent, calculator, search
from posttrain.pipeline.envs.tools.agent import ToolUse
from posttrain.pipeline.results import validate_rows, validate_summary

# ------------------------------------------------------------------------------------------ calculator


def test_safe_eval_computes_arithmetic():
    assert calculator.safe_eval("24*37-15") == 873
    assert calculator.safe_eval(" (1 + 2) * -3 ") == -9
    assert calculator.safe_eval("7/2") == 3.5 and calculator.format_number(7 / 2) == "3.5"
    assert calculator.safe_eval("2**10 % 1000 // 3") == 8
    assert calculator.format_number(calculator.safe_eval("10/2")) == "5"


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('os').system('touch /tmp/pwned')",  # a call
        "open('/etc/passwd').read()",
        "(1).__class__.__bases__[0].__subclasses__()",  # attribute walk to every class
        "[x for x in (1, 2)]",
        "lambda: 1",
        "x + 1",  # a name
        "'a' * 3",  # strings are not numbers
        "True + 1",  # nor are booleans
        "1 if 1 else 2",
        "9**9**9",  # an exponent that would build a number of millions of digits
        "10**40",  # beyond the magnitude bound
        "1/0",
        "(-8) ** 0.5",  # complex
        "1; 2",
        "1" * 300,
    ],
)
def test_safe_eval_refuses_anything_but_bounded_arithmetic(expression: str, tmp_path: Path):
    with pytest.raises(calculator.CalculatorError):
        calculator.safe_eval(expression)
    assert not Path("/tmp/pwned").exists()


def test_the_calculator_tool_answers_errors_as_tool_messages():
    from tinker_cookbook.tool_use import ToolInput

    tool = calculator.calculator

    ok = asyncio.run(tool.run(ToolInput({"expression": "46*32-158"})))
    assert ok.messages[0]["content"] == "1314" and ok.messages[0]["role"] == "tool"
    refused = asyncio.run(tool.run(ToolInput({"expression": "__import__('os')"})))
    assert (
        "only numbers" in refused.messages[0]["content"] and refused.metadata["error"] == "calculator_error"
    )


def _settings(**overrides) -> SimpleNamespace:
    """The settings an environment makes its problems from (ProblemSettings)."""
    base = {"seed": 0, "batch_size": 8, "max_steps": 5, "max_train_rows": 40, "max_eval_rows": 20}
    base |= {
        "model_name": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "renderer_name": None,
        "game_opponent": None,
    }
    return SimpleNamespace(**base | overrides)


def tool_problems(name: str, n_train: int, n_eval: int):
    cfg = _settings(max_train_rows=n_train, max_eval_rows=n_eval, batch_size=n_train)
    return ToolUse().problems(EnvSpec("tools", name), cfg, None)


def test_calculator_problems_are_seeded_and_held_out_from_another_seed():
    problems, again = tool_problems("calculator", 40, 20), tool_problems("calculator", 40, 20)
    assert problems.train == again.train and problems.eval == again.eval
    assert problems.eval == calculator.problems("test", 20, EVAL_SEED_OFFSET)
    assert not {p["question"] for p in problems.train} & {p["question"] for p in problems.eval}
    assert problems.info["max_turns"] == agent.DEFAULT_MAX_TURNS
    assert problems.info["source"].startswith("calculator: generated")
    for p in problems.train:
        assert p["grader"] == "math" and int(p["answer"]) >= 0


# ---------------------------------------------------------------------------------------- search corpus


def test_the_shipped_corpus_is_what_the_script_makes(tmp_path: Path):
    out = tmp_path / "corpus.jsonl"
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_search_corpus.py"), "--out", str(out)],
        check=True,
        capture_output=True,
    )
    assert out.read_bytes() == search.CORPUS_FILE.read_bytes()


def test_the_shipped_corpus_as_a_users_files_keeps_its_split(tmp_path: Path):
    """`--as-user-files DIR`: the README's warm-start measurement gives these files as corpus=, dataset= and
    eval_dataset=; the held-out file has exactly the held-out passages' questions."""
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_search_corpus.py"), "--as-user-files", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    docs, qa, held_out = (
        [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]
        for name in ("docs.jsonl", "qa.jsonl", "qa_eval.jsonl")
    )
    corpus = search.load_corpus()
    assert docs == [{"id": p["id"], "text": p["text"]} for p in corpus]
    for rows, split in ((qa, "train"), (held_out, "test")):
        assert rows == [
            {"question": q["question"], "answer": q["answer"]}
            for p in corpus
            if p["split"] == split
            for q in p["questions"]
        ]
    assert (len(qa), len(held_out)) == (720, 180)


def test_every_answer_is_in_its_passage_and_held_out_passages_are_never_trained_on():
    corpus = search.load_corpus()
    assert len(corpus) == 300 and len({p["id"] for p in corpus}) == 300
    for passage in corpus:
        for q in passage["questions"]:
            assert q["answer"] in passage["text"]
    problems = tool_problems("search", 500, 50)
    test_ids = {p["id"] for p in corpus if p["split"] == "test"}
    assert len(test_ids) == 60
    assert all(p["passage_id"] not in test_ids for p in problems.train)
    assert all(p["passage_id"] in test_ids for p in problems.eval) and len(problems.eval) == 50


def test_retrieval_returns_the_passage_that_holds_the_answer():
    retriever = search.corpus_retriever()
    corpus = search.load_corpus()
    for passage in corpus:
        for q in passage["questions"]:  # the question itself as the query: its passage comes first
            hits = retriever.search(q["question"])
            assert hits and hits[0]["id"] == passage["id"], q["question"]
            assert len(hits) <= search.SEARCH_RESULTS
    name = corpus[0]["text"].split(" is ")[0]
    assert retriever.search(name)[0]["id"] == corpus[0]["id"]  # a bare name is enough
    assert retriever.search("") == [] and retriever.search("the of and") == []
    assert retriever.search("xyzzy plugh") == []  # no word the corpus has


# ------------------------------------------------------------------------------------------------ env


def _renderer(tiny_model: str):
    from tinker_cookbook import renderers
    from tinker_cookbook.tokenizer_utils import get_tokenizer

    return renderers.get_renderer("qwen3_instruct", tokenizer=get_tokenizer(tiny_model))


def _turn(renderer, text: str) -> list[int]:
    return renderer.tokenizer.encode(text + "<|im_end|>", add_special_tokens=False)


def _call(name: str, **arguments: str) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


@pytest.mark.parametrize("name", ["calculator", "search"])
def test_the_env_runs_the_tool_then_rewards_the_final_answer(name: str, tiny_model: str):
    from posttrain.pipeline.scoring.scorer import Scorer

    renderer = _renderer(tiny_model)
    problem = tool_problems(name, 1, 1).eval[0]
    arguments = {"expression": "46*32-158"} if name == "calculator" else {"query": problem["question"]}
    expected = "1314" if name == "calculator" else "Her captain is"

    async def episode(final: str) -> tuple[list, object]:
        env = agent.make_env(
            problem, EnvContext(EnvSpec("tools", name, {"max_turns": 3}), renderer, Scorer())
        )
        reward = env.answer
        observation, _ = await env.initial_observation()
        prompt = renderer.tokenizer.decode(observation.to_ints())
        # the renderer's tool specs, the question
        assert "<tools>" in prompt and problem["question"] in prompt
        first = await env.step(_turn(renderer, _call(name, **arguments)))
        assert not first.episode_done and first.reward == 0.0
        assert f"<tool_response>\n{expected}" in renderer.tokenizer.decode(first.next_observation.to_ints())
        last = await env.step(_turn(renderer, final))
        return [first, last], reward

    if name == "search":  # the tool's reply starts with the question's own passage
        passage = next(p for p in search.load_corpus() if p["id"] == problem["passage_id"])
        expected = passage["text"][:30]
    steps, reward = asyncio.run(episode(f"#### {problem['answer']}"))
    assert steps[1].episode_done and steps[1].reward == 1.0
    assert steps[1].metrics["correct"] == 1.0 and steps[1].metrics["tool_calls"] == 1.0
    steps, reward = asyncio.run(episode("I do not know"))  # no answer marker: the format term
    assert steps[1].reward == pytest.approx(-0.1) and steps[1].metrics["correct"] == 0.0


def test_the_episode_ends_after_max_turns_and_a_malformed_call_ends_it_with_a_penalty(tiny_model: str):
    from posttrain.pipeline.scoring.scorer import Scorer

    renderer = _renderer(tiny_model)
    problem = tool_problems("calculator", 1, 1).eval[0]

    async def run(turns: list[str], max_turns: int) -> list:
        spec = EnvSpec("tools", "calculator", {"max_turns": max_turns})
        env = agent.make_env(problem, EnvContext(spec, renderer, Scorer()))
        await env.initial_observation()
        return [await env.step(_turn(renderer, t)) for t in turns]

    steps = asyncio.run(run([_call("calculator", expression="1+1")] * 2, max_turns=2))
    assert [s.episode_done for s in steps] == [False, True] and steps[1].metrics.get("max_turns") == 1.0
    steps = asyncio.run(run(["<tool_call>\n{not json}\n</tool_call>"], max_turns=3))
    assert steps[0].episode_done and steps[0].reward == pytest.approx(-0.1)


def test_concurrent_rendering_in_threads_gives_each_thread_its_own_tokenizer(tiny_model: str):
    # The cookbook env renders in worker threads; a shared Qwen-renderer tokenizer fails there with
    # "RuntimeError: Already borrowed" (split_special_tokens flips a flag on the Rust tokenizer).
    renderer = _renderer(tiny_model)
    safe = agent.thread_safe(renderer)
    conversations = [[{"role": "user", "content": f"question {i}"}] for i in range(100)]

    async def render_all() -> list[list[int]]:
        prompts = await asyncio.gather(
            *(asyncio.to_thread(safe.build_generation_prompt, c) for c in conversations)
        )
        return [p.to_ints() for p in prompts]

    assert asyncio.run(render_all()) == [renderer.build_generation_prompt(c).to_ints() for c in conversations]
    tokenizers = {id(r.tokenizer) for r in safe._copies.values()}
    assert len(tokenizers) == len(safe._copies) and id(renderer.tokenizer) not in tokenizers


def test_renderers_without_a_tool_call_format_are_the_ones_listed(tiny_model: str):
    from tinker_cookbook import renderers
    from tinker_cookbook.tokenizer_utils import get_tokenizer

    from posttrain.config.renderers import BUILTIN_RENDERERS

    tokenizer = get_tokenizer(tiny_model)
    without = []
    for name in BUILTIN_RENDERERS:
        try:
            renderer = renderers.get_renderer(name, tokenizer=tokenizer)
        except Exception:  # noqa: BLE001 - renderers that need their own model's special tokens
            continue
        try:
            renderer.create_conversation_prefix_with_tools(
                [{"name": "f", "description": "", "parameters": {}}]
            )
        except NotImplementedError:
            without.append(name)
    assert tuple(without) == agent.NO_TOOL_CALL_RENDERERS


# ---------------------------------------------------------------------------------------- bad settings


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["env=tools:abacus"], "env=tools:abacus: no such environment; allowed values: math, arithmetic"),
        (["env=tools:calculator:max_turns=0"], "max_turns=0 is not valid; expected 1 to 20"),
        (
            ["env=tools:search:depth=2"],
            "env=tools:search:depth=2: unknown option 'depth'; the only option is max_turns=N",
        ),
        (["env=tools:calculator", "renderer_name=role_colon"], "renderer 'role_colon' has none"),
    ],
)
def test_bad_tool_settings_are_one_line_before_anything_starts(args: list[str], needle: str, tmp_path: Path):
    proc = train_here([*args, "backend=local"], tmp_path)
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "results").exists()


# ------------------------------------------------------------------------------------------ end to end

FAST = [
    "renderer_name=qwen3_instruct",  # the default model's renderer; it has a tool-call format
    "batch_size=2",
    "group_size=2",
    "max_steps=1",
    "max_tokens=12",
    "max_eval_rows=3",
    "save_every=0",
    "eval_every=0",
    "lora_rank=4",
    "eval_concurrency=8",
]


@pytest.mark.parametrize("name", ["calculator", "search"])
def test_tool_env_end_to_end(name: str, tmp_path: Path, engine, tiny_model: str):
    proc = train_here(
        [
            f"env=tools:{name}:max_turns=2",
            *FAST,
            f"model_name={tiny_model}",
            f"base_url={engine.url}",
            f"run_name=tools-{name}",
        ],
        tmp_path,
    )
    assert proc.returncode in FINISHED, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = tmp_path / "results"
    summary = json.loads((results / "summary.json").read_text())
    assert summary.get("status") != "failed", summary.get("error")
    validate_summary(summary)
    assert summary["score_label"] == "accuracy" and summary["dataset"]["max_turns"] == 2
    assert summary["dataset"]["env"] == f"tools:{name}:max_turns=2"
    base, trained = read_jsonl(results / "base_model.jsonl"), read_jsonl(results / "trained_model.jsonl")
    for rows in (base, trained):
        validate_rows(rows, "score", "rl")
        assert len(rows) == 3
    assert [r["question"] for r in base] == [r["question"] for r in trained]  # the same held-out problems
    for row in base + trained:
        turns = row["transcript"]
        assert 1 <= len(turns) <= 2 and [t["turn"] for t in turns] == list(range(1, len(turns) + 1))
        extra = {"retrieved"} if name == "search" else set()  # the passage ids each turn's searches retrieved
        assert all(set(t) == {"turn", "player", "env", "reward", *extra} for t in turns)
        assert row["details"]["turns"] == len(turns) and row["details"]["tool_calls"] <= 2
        assert isinstance(row["correct"], bool)
    problems = read_jsonl(tmp_path / summary["log_path"] / "data" / "train_problems.jsonl")
    assert problems[0]["grader"] == ("math" if name == "calculator" else "exact_match")
    metrics = read_jsonl(tmp_path / summary["log_path"] / "metrics.jsonl")
    assert any("env/all/reward/total" in m for m in metrics)
