"""The decoding batch: the running rows, their shared cache, one forward pass per step."""

from __future__ import annotations

import math
from typing import TypeVar

import torch
from transformers import DynamicCache

from posttrain.engine.sampling.cache import (
    CACHE_GROWTH_TOKENS,
    KEY_ALIGN,
    RaggedLayer,
    RaggedState,
    ragged_cache,
)
from posttrain.engine.sampling.model import ModelRunner, Prefill
from posttrain.engine.sampling.tokens import Row, choose_tokens
from posttrain.util import round_up

_T = TypeVar("_T")


class Batch:
    """The running rows, their right-padded cache and their next-token logits."""

    def __init__(self, runner: ModelRunner, vocab_size: int) -> None:
        self.runner = runner
        self.vocab_size = vocab_size
        self.active: list[Row] = []
        self.cache: DynamicCache | None = None
        self.state: RaggedState | None = None
        self.layers: list[RaggedLayer] = []
        self.logits: torch.Tensor | None = None  # [len(active), V] float32
        self.columns = torch.arange(0, device=runner.device)
        # Per physical row (like state.lengths): M-RoPE position minus cache length, nonzero after images.
        self.rope_deltas = torch.zeros(0, dtype=torch.long, device=runner.device)
        self.shifted = False  # whether any row's delta is nonzero (positions then take the [4, B, 1] form)

    @property
    def longest_row(self) -> int:
        return max((row.prompt_len + row.max_new for row in self.active), default=0)

    def add(self, prefills: list[Prefill], rows: list[Row]) -> None:
        """Merge new rows (row.prompt_slot indexes `prefills`) into the batch, after the running ones."""
        if not rows:
            return
        device = self.runner.device
        logits = torch.stack([prefills[row.prompt_slot].next_logits for row in rows])
        # The physical batch is the active rows in order (active row i is physical row i), plus a copy of the
        # first one when only one is left: CPU matmul kernels take another path for a single row and round
        # differently, while with two or more rows each row's result does not depend on the others. Together
        # with the right-padded cache this keeps seeded samples independent of the batch's composition.
        physical = with_companion(rows) if not self.active else rows
        used = sorted({row.prompt_slot for row in rows})
        local = {slot: i for i, slot in enumerate(used)}
        row_prompt = torch.tensor(
            [local[row.prompt_slot] for row in physical], dtype=torch.long, device=device
        )
        lengths = torch.tensor([row.prompt_len for row in physical], dtype=torch.long, device=device)
        deltas = torch.tensor(
            [prefills[row.prompt_slot].rope_delta for row in physical], dtype=torch.long, device=device
        )
        self.shifted = self.shifted or any(prefills[row.prompt_slot].rope_delta for row in rows)
        reserve = min(max(row.max_new for row in rows), CACHE_GROWTH_TOKENS)
        max_width = round_up(max(row.prompt_len + row.max_new for row in rows), KEY_ALIGN)
        cache, state = ragged_cache(
            [prefills[slot] for slot in used], row_prompt, lengths, reserve, max_width
        )
        layers = [layer for layer in cache.layers if isinstance(layer, RaggedLayer)]
        if not self.active:
            self.cache, self.state, self.layers = cache, state, layers
            self.active, self.logits, self.rope_deltas = list(rows), logits, deltas
            return
        assert self.state is not None and self.logits is not None
        if self.state.lengths.shape[0] > len(self.active):  # drop the companion row
            keep = torch.arange(len(self.active), device=device)
            self.state.lengths = self.state.lengths.index_select(0, keep)
            self.rope_deltas = self.rope_deltas.index_select(0, keep)
            for layer in self.layers:
                layer.keep_rows(keep)
        for layer, extra in zip(self.layers, layers, strict=True):
            layer.append_rows(extra)
        self.state.lengths = torch.cat([self.state.lengths, state.lengths])
        self.rope_deltas = torch.cat([self.rope_deltas, deltas])
        self.state.rows = torch.arange(len(self.state.lengths), device=device)
        self.state.max_width = max(self.state.max_width, state.max_width)
        self.active = self.active + list(rows)
        self.logits = torch.cat([self.logits[: len(self.active) - len(rows)], logits])

    def step(self) -> list[Row]:
        """Pick one token for every active row; run the next forward pass for those that go on.

        Returns the rows that finished."""
        assert self.logits is not None and self.state is not None and self.cache is not None
        device = self.runner.device
        state, active = self.state, self.active
        logits = in_vocabulary(self.logits, self.vocab_size)
        tokens, logprobs = choose_tokens(logits[: len(active)], active)
        keep = [i for i, row in enumerate(active) if not row.push(tokens[i], logprobs[i])]
        finished = [row for i, row in enumerate(active) if row.stop_reason is not None]
        if not keep:
            self.__init__(self.runner, self.vocab_size)  # type: ignore[misc]
            return finished
        if len(keep) < len(active) or state.lengths.shape[0] != len(with_companion(active)):
            index = torch.tensor(with_companion(keep), dtype=torch.long, device=device)
            state.lengths = state.lengths.index_select(0, index)
            self.rope_deltas = self.rope_deltas.index_select(0, index)
            state.rows = torch.arange(len(index), device=device)
            for layer in self.layers:
                layer.keep_rows(index)
            active = [active[i] for i in keep]
            tokens = [tokens[i] for i in keep]
        self.active = active
        next_ids = torch.tensor(with_companion(tokens), dtype=torch.long, device=device)
        state.width = round_up(int(state.lengths.max()) + 1, KEY_ALIGN)
        if self.columns.shape[0] != state.width:
            self.columns = torch.arange(state.width, device=device)
        mask = (self.columns.unsqueeze(0) <= state.lengths.unsqueeze(1)).long()
        out = self.runner.forward(
            next_ids.unsqueeze(1),
            position_ids=self._positions(),
            cache=self.cache,
            attention_mask=mask,
        )[:, -1]
        state.lengths = state.lengths + 1
        self.logits = out[: len(active)]
        return finished

    def _positions(self) -> torch.Tensor:
        """Each row's position for its next token: its cache length, [B, 1]. After images (M-RoPE, a nonzero
        delta) [4, B, 1]: the length (the attention mask's position), then length + delta on the 3 axes."""
        assert self.state is not None
        lengths = self.state.lengths.unsqueeze(1)
        if not self.shifted:
            return lengths
        shifted = lengths + self.rope_deltas.unsqueeze(1)
        return torch.stack([lengths, shifted, shifted, shifted])


def in_vocabulary(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """`logits` [B, V'] with a padded lm_head's extra ids (V' > vocab_size) set to -inf: never sampled."""
    if logits.shape[1] > vocab_size:
        logits[:, vocab_size:] = -math.inf
    return logits


def with_companion(items: list[_T]) -> list[_T]:
    return items if len(items) >= 2 else items + items[:1]
