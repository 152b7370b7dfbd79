"""Rows: per-sample state, stop detection (stop tokens, stop strings) and token choice."""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from posttrain.engine.sampling.plan import Unit
from posttrain.engine.sampling.requests import GeneratedSequence, StopReason

# Top-k / top-p rows are first sampled among this many best tokens (see `sample_filtered`).
FILTER_CANDIDATES = 256
# Incremental detokenization re-decodes this many tokens before the new ones (context for leading spaces).
DETOKENIZE_CONTEXT_TOKENS = 5


class StopStringMatcher:
    """Incremental detokenization of the generated suffix; reports when a stop string appears in it."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, prompt: list[int], stop_strings: list[str]
    ) -> None:
        self.tokenizer = tokenizer
        self.stop_strings = stop_strings
        self.longest = max(len(s) for s in stop_strings)
        # A few prompt tokens give the first generated token its context (e.g. SentencePiece leading spaces).
        self.ids = list(prompt[-DETOKENIZE_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def push(self, token: int) -> bool:
        self.ids.append(token)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix):
            return False
        new_text = full[len(prefix) :]
        # A trailing U+FFFD is an incomplete UTF-8 sequence: the characters before it are final and are
        # searched now, but the text is committed (and the offsets move) only once the character completes.
        complete = new_text.rstrip("\ufffd")
        tail = self.text[max(0, len(self.text) - self.longest + 1) :] + complete
        if len(complete) == len(new_text):
            self.text += new_text
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return any(s in tail for s in self.stop_strings)


def row_seed(seed: int | None, sample_index: int) -> int:
    if seed is None:
        return secrets.randbits(63)
    digest = hashlib.blake2b(f"{seed}:{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class Row:
    def __init__(
        self,
        unit: Unit,
        sample_index: int,
        prompt_slot: int,
        eos_ids: frozenset[int],
        tokenizer: PreTrainedTokenizerBase | None,
    ) -> None:
        plan = unit.plan
        spec = plan.request.spec
        self.plan = plan
        self.key: object = None  # the DecodeLoop key of the request
        self.sample_index = sample_index
        self.prompt_slot = prompt_slot
        self.prompt_len = len(plan.request.prompt_tokens)
        self.max_new = plan.max_new
        self.temperature = float(spec.temperature)
        self.top_k = int(spec.top_k)
        self.top_p = float(spec.top_p)
        self.stop_ids = eos_ids if plan.stop_ids is None else plan.stop_ids
        self.matcher: StopStringMatcher | None = None
        if plan.stop_strings:
            assert tokenizer is not None
            self.matcher = StopStringMatcher(tokenizer, plan.request.prompt_tokens, plan.stop_strings)
        self.generator: torch.Generator | None = None
        if self.temperature > 0:
            self.generator = torch.Generator(device="cpu")
            self.generator.manual_seed(row_seed(spec.seed, sample_index))
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.stop_reason: StopReason | None = None if self.max_new > 0 else "length"

    def uniform(self) -> float:
        assert self.generator is not None
        return float(torch.rand((), generator=self.generator, dtype=torch.float64))

    def push(self, token: int, logprob: float) -> bool:
        """Record a sampled token; return True when the row is finished."""
        self.tokens.append(token)
        self.logprobs.append(logprob)
        if token in self.stop_ids or (self.matcher is not None and self.matcher.push(token)):
            self.stop_reason = "stop"
        elif len(self.tokens) >= self.max_new:
            self.stop_reason = "length"
        return self.stop_reason is not None

    def result(self) -> GeneratedSequence:
        assert self.stop_reason is not None
        return GeneratedSequence(tokens=self.tokens, logprobs=self.logprobs, stop_reason=self.stop_reason)


def choose_tokens(logits: torch.Tensor, rows: Sequence[Row]) -> tuple[list[int], list[float]]:
    """Pick one token per row from float32 logits [B, V]; return the tokens and their raw logprobs.

    Each row's pick depends only on its own logits and its own generator: rows with top-k/top-p always take
    the sorted path and the others the unsorted one, whatever else is in the batch.
    """
    vocab = logits.shape[1]
    logprobs = torch.log_softmax(logits, dim=-1)
    tokens = logits.argmax(dim=-1)
    plain: list[int] = []
    filtered: list[int] = []
    for i, row in enumerate(rows):
        if row.temperature > 0:
            (filtered if 0 < row.top_k < vocab or row.top_p < 1 else plain).append(i)
    for group in (plain, filtered):
        if not group:
            continue
        index = torch.tensor(group, dtype=torch.long, device=logits.device)
        group_rows = [rows[i] for i in group]
        temperature = logits.new_tensor([r.temperature for r in group_rows]).unsqueeze(1)
        scaled = logits.index_select(0, index) / temperature
        uniforms = torch.tensor([r.uniform() for r in group_rows], dtype=torch.float64, device=logits.device)
        if group is plain:
            picks = inverse_cdf(torch.softmax(scaled, dim=-1), uniforms)
        else:
            top_k = [r.top_k if 0 < r.top_k < vocab else vocab for r in group_rows]
            top_p = [r.top_p for r in group_rows]
            picks = sample_filtered(scaled, top_k, top_p, uniforms)
        tokens = tokens.index_copy(0, index, picks)
    chosen_logprobs = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
    return tokens.tolist(), chosen_logprobs.tolist()


def sample_filtered(
    scaled: torch.Tensor, top_k: list[int], top_p: list[float], uniforms: torch.Tensor
) -> torch.Tensor:
    """Sample from tempered logits [B, V] restricted by top-k (k = V: none), then top-p (1: none).

    Top-k keeps the k most likely tokens and renormalizes; top-p then keeps each token whose preceding mass
    (in decreasing order) is below p, so the first always stays. Sorting a 50k vocabulary costs more than a
    small model's decode step, so rows are first tried on their `FILTER_CANDIDATES` best tokens (exact when
    the top-k or the nucleus ends inside them), and only the others sort everything. Candidates are ordered by
    (logit desc, token id asc), as the full sort orders them.
    """
    batch, vocab = scaled.shape
    device = scaled.device
    picks = torch.empty(batch, dtype=torch.long, device=device)
    k_limit = torch.tensor(top_k, device=device)
    p_limit = torch.tensor(top_p, dtype=scaled.dtype, device=device)
    # The candidate count is the same for every row (it must not depend on the other rows in the batch).
    width = FILTER_CANDIDATES
    candidate_rows = [i for i, k in enumerate(top_k) if width < vocab and (k <= width or k == vocab)]
    pending = sorted(set(range(batch)) - set(candidate_rows))
    if candidate_rows:
        index = torch.tensor(candidate_rows, dtype=torch.long, device=device)
        rows, k_rows, p_rows = scaled.index_select(0, index), k_limit[index], p_limit[index]
        values, ids = rows.topk(width, dim=-1)
        by_id = ids.argsort(dim=-1)
        ids, values = ids.gather(1, by_id), values.gather(1, by_id)
        values, order = values.sort(dim=-1, descending=True, stable=True)
        ids = ids.gather(1, order)
        has_k = k_rows < vocab
        kept = values.masked_fill(torch.arange(width, device=device) >= k_rows.unsqueeze(1), -math.inf)
        log_norm = torch.where(has_k, kept.logsumexp(dim=-1), rows.logsumexp(dim=-1))
        probs = torch.exp(kept - log_norm.unsqueeze(1))
        cumulative = probs.cumsum(dim=-1)
        exact = (has_k | (cumulative[:, -1] >= p_rows)).tolist()
        outside = (cumulative - probs >= p_rows.unsqueeze(1)) & (p_rows < 1).unsqueeze(1)
        probs = probs.masked_fill(outside, 0.0)
        chosen = ids.gather(1, inverse_cdf(probs, uniforms[index]).unsqueeze(1)).squeeze(1)
        for j, row in enumerate(candidate_rows):
            if exact[j]:
                picks[row] = chosen[j]
            else:
                pending.append(row)
    if pending:
        pending_index = torch.tensor(pending, dtype=torch.long, device=device)
        rows = scaled.index_select(0, pending_index)
        values, ids = rows.sort(dim=-1, descending=True, stable=True)
        k_rows = k_limit.index_select(0, pending_index).unsqueeze(1)
        values = values.masked_fill(torch.arange(vocab, device=device) >= k_rows, -math.inf)
        probs = torch.softmax(values, dim=-1)
        p_rows = p_limit.index_select(0, pending_index).unsqueeze(1)
        probs = probs.masked_fill((probs.cumsum(dim=-1) - probs >= p_rows) & (p_rows < 1), 0.0)
        row_uniforms = uniforms.index_select(0, pending_index)
        picks[pending_index] = ids.gather(1, inverse_cdf(probs, row_uniforms).unsqueeze(1)).squeeze(1)
    return picks


def inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Sample one index per row of (unnormalized) `probs` with one uniform draw per row."""
    cdf = probs.double().cumsum(dim=-1)
    targets = (uniforms * cdf[:, -1]).unsqueeze(1)
    picks = torch.searchsorted(cdf, targets, right=True).squeeze(1)
    return picks.clamp_(max=probs.shape[1] - 1)
