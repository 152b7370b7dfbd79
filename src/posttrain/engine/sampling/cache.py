"""The right-padded decode cache: per-row lengths over preallocated buffers that grow in blocks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from posttrain.engine.sampling.model import Prefill
from posttrain.util import round_up

# The decode cache grows by at least this many slots at a time.
CACHE_GROWTH_TOKENS = 128
# The key width of a decode step is a multiple of this: how a row's keys split into vector lanes and blocks
# inside the attention kernel then never depends on the other rows (masked slots add exact zeros).
KEY_ALIGN = 64


@dataclass
class RaggedState:
    """What the layers of one decode cache share: each row's length and the width of the next step."""

    lengths: torch.Tensor  # [B] tokens cached per row; row b holds them at key positions [0, lengths[b])
    rows: torch.Tensor  # [B] arange, for the per-row scatter of new keys
    width: int  # key width of the next forward: max(lengths) + 1, rounded up to KEY_ALIGN
    max_width: int  # no row ever needs more slots than this (longest prompt + completion, aligned)


class RaggedLayer(DynamicLayer):
    """A cache layer with per-row lengths over preallocated [B, H, capacity, D] buffers.

    Rows are right-padded: a row's keys sit at positions [0, length) and a decode step writes each row's new
    key at its own length. This keeps a sequence's keys at the same positions whatever else is in the batch
    (with left padding they would shift with the longest prompt, and attention kernels sum differently), and
    appending writes one slot instead of re-concatenating the whole cache. The model sees a key width of
    `state.width`; the attention mask hides each row's unused slots.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, state: RaggedState) -> None:
        super().__init__()
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self._key_buffer = keys
        self._value_buffer = values
        self.state = state
        self._refresh_views()

    def _refresh_views(self) -> None:
        self.keys = self._key_buffer[:, :, : self.state.width]
        self.values = self._value_buffer[:, :, : self.state.width]

    def _reserve(self, needed: int) -> None:
        capacity = self._key_buffer.shape[2]
        if needed <= capacity:
            return
        grown = capacity + round_up(max(needed - capacity, CACHE_GROWTH_TOKENS, capacity // 2), KEY_ALIGN)
        extra = max(min(grown, self.state.max_width), needed) - capacity
        shape = (*self._key_buffer.shape[:2], extra, self._key_buffer.shape[3])
        self._key_buffer = torch.cat([self._key_buffer, self._key_buffer.new_zeros(shape)], dim=2)
        shape = (*self._value_buffer.shape[:2], extra, self._value_buffer.shape[3])
        self._value_buffer = torch.cat([self._value_buffer, self._value_buffer.new_zeros(shape)], dim=2)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if key_states.shape[-2] != 1:
            raise RuntimeError("the ragged decode cache takes one token per row and step")
        self._reserve(self.state.width)
        index = (self.state.rows, slice(None), self.state.lengths)
        self._key_buffer[index] = key_states[:, :, 0].to(self.dtype)
        self._value_buffer[index] = value_states[:, :, 0].to(self.dtype)
        self._refresh_views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        # The model derives the key width of the mask from this: width - 1 cached + 1 new token.
        return self.state.width - 1

    def keep_rows(self, rows: torch.Tensor) -> None:
        self._key_buffer = self._key_buffer.index_select(0, rows)
        self._value_buffer = self._value_buffer.index_select(0, rows)
        self._refresh_views()

    def append_rows(self, other: RaggedLayer) -> None:
        """Add `other`'s rows after these (both buffers padded to the larger capacity)."""
        capacity = max(self._key_buffer.shape[2], other._key_buffer.shape[2])

        def padded(buffer: torch.Tensor) -> torch.Tensor:
            missing = capacity - buffer.shape[2]
            if missing == 0:
                return buffer
            shape = (*buffer.shape[:2], missing, buffer.shape[3])
            return torch.cat([buffer, buffer.new_zeros(shape)], dim=2)

        self._key_buffer = torch.cat([padded(self._key_buffer), padded(other._key_buffer).to(self.dtype)])
        self._value_buffer = torch.cat(
            [padded(self._value_buffer), padded(other._value_buffer).to(self.dtype)]
        )
        self._refresh_views()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.keep_rows(indices)


def ragged_cache(
    prefills: Sequence[Prefill],
    row_prompt: torch.Tensor,
    lengths: torch.Tensor,
    reserve: int,
    max_width: int,
) -> tuple[DynamicCache, RaggedState]:
    """One right-padded cache for all rows: row i continues prompt `row_prompt[i]`."""
    device = lengths.device
    rows = torch.arange(len(lengths), device=device)
    state = RaggedState(lengths=lengths, rows=rows, width=0, max_width=max_width)
    capacity = min(round_up(max(p.keys[0].shape[2] for p in prefills) + reserve, KEY_ALIGN), max_width)
    layers: list[DynamicLayer] = []
    for layer in range(len(prefills[0].keys)):
        merged: list[torch.Tensor] = []
        for tensors in ([p.keys[layer] for p in prefills], [p.values[layer] for p in prefills]):
            first = tensors[0]
            stacked = first.new_zeros((len(tensors), first.shape[1], capacity, first.shape[3]))
            for i, t in enumerate(tensors):
                stacked[i, :, : t.shape[2]] = t[0].to(first.dtype)
            merged.append(stacked.index_select(0, row_prompt))
        layers.append(RaggedLayer(merged[0], merged[1], state))
    cache = DynamicCache()
    cache.layers = layers
    cache.layer_class_to_replicate = None
    return cache, state
