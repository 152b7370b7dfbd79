"""`env=tools:search`: questions answered by searching a corpus.

By default the corpus is a shipped one of 300 short passages about invented entities (`data/search_corpus.jsonl`,
made by `scripts/make_search_corpus.py`), searched with BM25 (`bm25s`, in memory); questions on a fixed fifth of
the passages are held out for evaluation, so no evaluation answer is ever trained on. Its answers are names and
numbers from the passages, graded by exact match after normalisation.

With `corpus=FILE dataset=QA` the corpus is the user's (`tools.corpus`) and the questions are the dataset's rows,
graded by token F1 (exact match as `correct`); `retriever=chroma` (the default there) searches it by embeddings
(`tools.vector_store`), `retriever=bm25` by words. Each problem names its corpus and retriever, so an episode
finds them from its problem alone, in training and in evaluation.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol

from tinker_cookbook.tool_use import ToolResult, simple_tool_result, tool

from posttrain.pipeline.envs.base import ProblemSet
from posttrain.pipeline.envs.tools import corpus as user_corpus
from posttrain.pipeline.scoring.grading import normalize_text
from posttrain.util import PACKAGE_DATA

if TYPE_CHECKING:
    from posttrain.pipeline.data import LoadedData

CORPUS_FILE = PACKAGE_DATA / "search_corpus.jsonl"
SEARCH_RESULTS = 2
SOURCE = "questions about a shipped corpus of 300 passages"
INSTRUCTIONS = (
    "Search for the facts you need with the search tool. Then give only the final answer after ####."
)
EXAMPLE = (
    "Who built the Olvenmark Tower?",
    {"query": "Olvenmark Tower"},
    "The Olvenmark Tower is a stone tower by the sea. It was built in 1721 by Teodor Vlask.",
    "Teodor Vlask",
)
RetrieverName = Literal["chroma", "bm25"]
# The user's questions are free text: token F1 as the reward, exact match as `correct` (scoring.GRADERS).
USER_GRADER = "f1"


@cache
def load_corpus(path: Path = CORPUS_FILE) -> tuple[dict, ...]:
    return tuple(json.loads(line) for line in path.read_text().splitlines() if line.strip())


def problems(split: str, n: int, seed: int) -> list[dict]:
    """`n` questions on the shipped passages of `split` ("train" or "test"), drawn by `seed` (with repeats if more
    are asked for than there are)."""
    pool = [
        {
            "question": q["question"],
            "answer": q["answer"],
            "grader": "exact_match",
            "passage_id": p["id"],
        }
        for p in load_corpus()
        if p["split"] == split
        for q in p["questions"]
    ]
    rng = random.Random(seed)
    if n <= len(pool):
        return rng.sample(pool, n)
    return [rng.choice(pool) for _ in range(n)]


class Retriever(Protocol):
    def search(self, query: str, k: int) -> list[dict]: ...


class BM25Retriever:
    """BM25 over the corpus passages (`bm25s`, in memory; 300 passages index in milliseconds)."""

    def __init__(self, passages: tuple[dict, ...] | list[dict]):
        import bm25s

        # bm25s sets its own logger to DEBUG at import; its "Building index" lines would reach the user's terminal
        # when the index is built before the run's library output goes to console.log (a dry run, method checks).
        logging.getLogger("bm25s").setLevel(logging.WARNING)
        self.passages = list(passages)
        self._bm25 = bm25s.BM25()
        self._bm25.index(self._tokenize([user_corpus.shown(p) for p in self.passages]), show_progress=False)

    @staticmethod
    def _tokenize(texts: list[str]) -> Any:
        import bm25s

        return bm25s.tokenize(texts, stopwords="en", show_progress=False)

    def search(self, query: str, k: int = SEARCH_RESULTS) -> list[dict]:
        """The best `k` passages with a positive score (none when no query word is in the corpus)."""
        tokens = self._tokenize([query])
        if not tokens.ids or not tokens.ids[0]:
            return []
        # Query words the index has never seen carry no weight; with none left there is nothing to rank.
        known = [w for w in tokens.vocab if w in self._bm25.vocab_dict]
        if not known:
            return []
        docs, scores = self._bm25.retrieve([known], k=min(k, len(self.passages)), show_progress=False)
        return [self.passages[int(d)] for d, s in zip(docs[0], scores[0], strict=True) if s > 0]


# One parse per corpus file and process, shared with the check made before this module is imported.
load_user_corpus = user_corpus.loaded


@cache
def retriever(corpus: str | None, kind: RetrieverName) -> Retriever:
    """One retriever per corpus file (None: the shipped one) and kind for the whole process: built once, shared
    by every episode."""
    from posttrain.pipeline.envs.tools.vector_store import VectorRetriever

    loaded = load_user_corpus(Path(corpus) if corpus else CORPUS_FILE)
    return BM25Retriever(loaded.passages) if kind == "bm25" else VectorRetriever(loaded)


def corpus_retriever() -> Retriever:
    """The shipped corpus's BM25 retriever."""
    return retriever(None, "bm25")


def retriever_for(problem: dict) -> Retriever:
    return retriever(problem.get("corpus"), problem.get("retriever", "bm25"))


class Search:
    """One episode's search tool. The cookbook keeps only a tool's reply text, so the ids of the passages each call
    retrieved are kept here, by the turn the call was made in (`turn`, set by the env that runs the tool)."""

    def __init__(self, found: Retriever | None = None):
        self.retriever = found
        self.tools = [self.search]
        self.turn: Callable[[], int] = lambda: 0
        self.retrieved: dict[int, list[str]] = {}

    @tool
    async def search(
        self, query: Annotated[str, "what to look for, e.g. a name from the question"]
    ) -> ToolResult:
        """Search the document collection; returns the passages that match the query best."""
        assert self.retriever is not None, (
            "the module's TOOLS are the specification; episodes use episode_tools"
        )
        hits = self.retriever.search(query, SEARCH_RESULTS)
        self.retrieved.setdefault(self.turn(), []).extend(p["id"] for p in hits)
        return simple_tool_result(reply(hits))

    def turn_details(self, turn: int) -> dict[str, Any]:
        """What a results row's transcript adds to turn `turn`: the passage ids retrieved in it."""
        return {"retrieved": self.retrieved.get(turn, [])}


def reply(hits: list[dict]) -> str:
    """The tool's reply to a search that found `hits`."""
    return "\n".join(user_corpus.shown(p) for p in hits) if hits else "No results."


def demonstration(problem: dict) -> tuple[dict, str] | None:
    """A worked answer to `problem` for a warm start (`methods.warm_start`): the call (the question itself as the
    query) and the tool's real reply, or None when that search does not find the answer: a demonstration that
    answers what its search did not return would teach the model to guess."""
    query = problem["question"]
    found = reply(retriever_for(problem).search(query, SEARCH_RESULTS))
    # Whole words: the answer "cat" is not in a reply about a "category".
    if f" {normalize_text(str(problem['answer']))} " not in f" {normalize_text(found)} ":
        return None
    return {"query": query}, found


# The tools' specification, for the prompt; each episode runs its own (`episode_tools`).
TOOLS = [Search().search]


def episode_tools(problem: dict) -> Search:
    return Search(retriever_for(problem))


def user_problems(corpus: Path | None, kind: RetrieverName, data: LoadedData | None) -> ProblemSet:
    """The dataset's question/answer rows as problems over the user's corpus, whose index is built (or opened)
    now: a corpus that cannot be indexed stops the run before anything is spent."""
    from posttrain.pipeline.envs.qa import GRADER_LABELS, qa_problems

    passages = user_corpus.checked(corpus, data).passages
    assert corpus is not None and data is not None  # `checked` refused them otherwise
    where = {"corpus": str(corpus), "retriever": kind}
    info = {
        "source": f"search: {data.source}, over corpus={corpus} ({len(passages)} passages)",
        "eval_source": data.eval_source,
        "retriever": describe(retriever(str(corpus), kind)),
        "grader": USER_GRADER,
        "grader_reason": "questions about the user's corpus: token F1 as the reward, exact match as correct",
        "score_label": GRADER_LABELS[USER_GRADER],
    }
    train, held_out = (
        [{**p, **where} for p in qa_problems(rows, USER_GRADER)] for rows in (data.train, data.eval)
    )
    return ProblemSet(train, held_out, info)


def describe(found: Retriever) -> str:
    from posttrain.pipeline.envs.tools.vector_store import VectorRetriever, embedding_model_name

    if not isinstance(found, VectorRetriever):
        return "bm25 (bm25s, in memory)"
    state = f"built now ({found.embedded} passages embedded)" if found.embedded else "reused"
    return f"chroma ({embedding_model_name()}), index {found.path} {state}"
