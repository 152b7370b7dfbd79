"""Seeds for requests that carry none, derived from the session, so a seeded client's whole run reproduces.

The cookbook's training loops create the LoRA (`create_lora_training_client`) and sample rollouts without a
seed, and we keep those loops unmodified. What every session of a client does carry is its tags, which the SDK
takes from the `TINKER_TAGS` environment variable: a session tagged `seed=N` gets, for every request without a
seed of its own,

- a LoRA initialisation seeded by (N, the model's sequence number in the session), and
- a sampling seed per request from (N, the sampler's id within the session, the prompt's tokens, how
  many requests with the same prompt that sampler has had before), so concurrent requests get the same seeds
  whatever order they arrive in (identical prompts are interchangeable).

Sessions without the tag keep the SDK's meaning of "no seed": a fresh random draw.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable

SEED_TAG = "seed="


def session_seed(tags: Iterable[object]) -> int | None:
    """N from a `seed=N` tag (the last one wins), else None."""
    seed = None
    for tag in tags:
        if isinstance(tag, str) and tag.startswith(SEED_TAG) and tag[len(SEED_TAG) :].lstrip("-").isdigit():
            seed = int(tag[len(SEED_TAG) :])
    return seed


def derive(seed: int, *parts: object) -> int:
    """A 63-bit seed from the session's seed and what identifies the request."""
    digest = hashlib.blake2b(repr((seed, *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def split_session(object_id: str) -> tuple[str, str]:
    """('s1a2b', 'train:0:sampler:5') from 's1a2b:train:0:sampler:5': the session, and the id within it (the
    same in every run that makes its requests in the same order, unlike the session's random id)."""
    session, _, local = object_id.partition(":")
    return session, local


class SampleSeeds:
    """Per-request sampling seeds for one engine: counts the requests each sampler has had per prompt."""

    def __init__(self) -> None:
        self._seen: Counter[tuple[str, str]] = Counter()

    def seed_for(self, seed: int, sampler_id: str, prompt_key: object) -> int:
        prompt = hashlib.blake2b(repr(prompt_key).encode(), digest_size=16).hexdigest()
        occurrence = self._seen[(sampler_id, prompt)]
        self._seen[(sampler_id, prompt)] += 1
        return derive(seed, "sample", split_session(sampler_id)[1], prompt, occurrence)

    def forget_session(self, session_id: str) -> None:
        """Drop the counts of a finished session's samplers (a long-lived engine would otherwise keep them all)."""
        for key in [k for k in self._seen if split_session(k[0])[0] == session_id]:
            del self._seen[key]
