"""What sampling records for StableReinforce (`record_stability_info`), and the provenance that names it.

A sampling request made with `record_stability_info=true` keeps, for each returned sequence, its prompt and
its sampled tokens with the sampler's own log-probabilities, under the sequence's id (`sample_sequence_ids`).
A training datum then says, through its provenance spans, which positions are which sequence's prompt or
sampled tokens; the `stable_reinforce` loss takes the sampling-time log-probabilities from this record (the
sampler's numerics, not what the client sends), as the Tinker docs describe: "minimal additional information
captured at sampling time". Records live for a day after their last use, as on Tinker, within a bounded count.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from posttrain.engine.errors import WireError
from posttrain.engine.wire import ProvenanceSpan

RECORD_TTL_SECONDS = 24 * 3600
MAX_RECORDS = 200_000  # ~2 KB each for a 256-token completion


@dataclass
class SampledRecord:
    session_id: str | None
    prompt: list[int]
    tokens: list[int]
    logprobs: list[float]
    used: float = field(default_factory=time.monotonic)


class StabilityRecords:
    """Sampled sequences by id, oldest first; written by the sampler, read by training (different threads)."""

    def __init__(self, max_records: int = MAX_RECORDS, ttl: float = RECORD_TTL_SECONDS):
        self._records: OrderedDict[str, SampledRecord] = OrderedDict()
        self._lock = threading.Lock()
        self.max_records, self.ttl = max_records, ttl

    def __len__(self) -> int:
        return len(self._records)

    def add(self, sequence_id: str, record: SampledRecord) -> None:
        with self._lock:
            self._records[sequence_id] = record
            self._records.move_to_end(sequence_id)
            self._expire(time.monotonic())

    def get(self, sequence_id: str) -> SampledRecord | None:
        with self._lock:
            now = time.monotonic()
            self._expire(now)
            record = self._records.get(sequence_id)
            if record is not None:  # each training request that uses a sequence restarts its day
                record.used = now
                self._records.move_to_end(sequence_id)
            return record

    def _expire(self, now: float) -> None:
        while self._records:
            oldest_id, oldest = next(iter(self._records.items()))
            if len(self._records) <= self.max_records and now - oldest.used <= self.ttl:
                return
            del self._records[oldest_id]


def session_of(entity_id: str) -> str | None:
    """The session an engine id belongs to (`SESSION:train:N`, `SESSION:sample:N`); None for ad-hoc ones."""
    for marker in (":train:", ":sample:"):
        if marker in entity_id:
            return entity_id.split(marker, 1)[0]
    return None


def sampled_mask(spans: list[ProvenanceSpan], n: int) -> torch.Tensor:
    """1 at the target positions the spans say are sampled tokens, 0 elsewhere (prompt tokens)."""
    mask = torch.zeros(n)
    start = 0
    for span in spans:
        if span.kind == "sampled":
            mask[start : start + span.length] = 1.0
        start += span.length
    return mask


def sampled_inputs(
    records: StabilityRecords,
    spans: list[ProvenanceSpan],
    target: torch.Tensor,
    session: str | None,
    index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For one datum: (the sampler's recorded log-probability at each target position, 0 where none; a mask of
    the positions that are sampled tokens). Every span must name a recorded sequence of this session and agree
    with what was sampled; a WireError names the first that does not."""
    sampler_lp = torch.zeros(target.shape[0])
    start = 0
    for span in spans:
        record = records.get(span.sequence_id)
        where = f"datum {index}: provenance span of sequence {span.sequence_id!r}"
        if record is None:
            raise WireError(
                f"{where}: no such recorded sequence (sampled without record_stability_info=True, by another "
                "server or more than a day ago)"
            )
        if session is not None and record.session_id is not None and record.session_id != session:
            raise WireError(
                f"{where}: it was sampled in session {record.session_id}, not this run's {session}"
            )
        source = record.tokens if span.kind == "sampled" else record.prompt
        if span.offset + span.length > len(source):
            raise WireError(
                f"{where}: positions {span.offset}..{span.offset + span.length} are past its "
                f"{len(source)} {span.kind} tokens"
            )
        if target[start : start + span.length].tolist() != source[span.offset : span.offset + span.length]:
            raise WireError(
                f"{where}: target_tokens {start}..{start + span.length} are not the {span.kind} tokens"
            )
        if span.kind == "sampled":
            values = record.logprobs[span.offset : span.offset + span.length]
            sampler_lp[start : start + span.length] = torch.tensor(values)
        start += span.length
    return sampler_lp, sampled_mask(spans, target.shape[0])
