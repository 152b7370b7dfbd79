"""`env=tools:search`: questions about a shipped corpus of 300 short passages about invented entities
(`data/search_corpus.jsonl`, made by `scripts/make_search_corpus.py`), searched with BM25 (`bm25s`, in memory);
questions on a fixed fifth of the passages are held out for evaluation, so no evaluation answer is ever trained
on. The answers are names and numbers from the passages, graded by exact match after normalisation."""

from __future__ import annotations

import json
import random
from functools import cache
from pathlib import Path
from typing import Annotated, Any

from tinker_cookbook.tool_use import ToolResult, simple_tool_result, tool

from posttrain.util import PACKAGE_DATA

CORPUS_FILE = PACKAGE_DATA / "search_corpus.jsonl"
SEARCH_RESULTS = 2
SOURCE = "questions about a shipped corpus of 300 passages (BM25 search)"
INSTRUCTIONS = "Search for the facts you need with the search tool. Then give only the final answer after ####."
EXAMPLE = (
    "Who built the Olvenmark Tower?",
    {"query": "Olvenmark Tower"},
    "The Olvenmark Tower is a stone tower by the sea. It was built in 1721 by Teodor Vlask.",
    "Teodor Vlask",
)


@cache
def load_corpus(path: Path = CORPUS_FILE) -> tuple[dict, ...]:
    return tuple(json.loads(line) for line in path.read_text().splitlines() if line.strip())


def problems(split: str, n: int, seed: int) -> list[dict]:
    """`n` questions on the passages of `split` ("train" or "test"), drawn by `seed` (with repeats if more
    are asked for than there are)."""
    pool = [
        {
            "question": q["question"],
            "answer": q["answer"],
            "grader": "exact_match",
            "passage_id": p["id"],
        }  # fmt: skip
        for p in load_corpus()
        if p["split"] == split
        for q in p["questions"]
    ]
    rng = random.Random(seed)
    if n <= len(pool):
        return rng.sample(pool, n)
    return [rng.choice(pool) for _ in range(n)]


class Retriever:
    """BM25 over the corpus passages (`bm25s`, in memory; 300 passages index in milliseconds)."""

    def __init__(self, passages: tuple[dict, ...] | list[dict]):
        import bm25s

        self.passages = list(passages)
        self._bm25 = bm25s.BM25()
        self._bm25.index(self._tokenize([p["text"] for p in self.passages]), show_progress=False)

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


@cache
def corpus_retriever() -> Retriever:
    return Retriever(load_corpus())




@tool
async def search(query: Annotated[str, "what to look for, e.g. a name from the question"]) -> ToolResult:
    """Search the encyclopedia; returns the passages that match the query best."""
    hits = corpus_retriever().search(query)
    return simple_tool_result("\n".join(p["text"] for p in hits) if hits else "No results.")


TOOLS = [search]
