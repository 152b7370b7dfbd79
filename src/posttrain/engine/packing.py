"""Datums packed into a few repeating matmul shapes: the micro-batches of a training step.

Packing several datums into one sequence (each with positions restarting at 0, which the model's attention keeps
apart) pads far less than padding each datum to the longest; one width per request keeps oneDNN's kernels reused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain.util import round_up

# Datums are packed into sequences of a multiple of this many tokens (see `_micro_batches`), or of 192 where that
# pads less: 32 datums of 48 tokens fill 8 packs of 192 exactly but take 7 of 256 (14% padding); the default
# run's rows (45-126 tokens) pad 11% at 256, 9% with the choice. More narrow widths (128-224) padded 8% there but
# made more distinct matmul shapes, each with its own kernel and memory in oneDNN (engine peak 2638 vs 2494 MB
# in one default run each). For a model that cannot keep packed sequences apart, each datum is padded to the longest,
# rounded up to a multiple of 16.
PACK_TOKENS = 256
NARROW_PACK_WIDTHS = (192,)
# A datum longer than PACK_TOKENS may also take the narrowest multiple of this that holds it: alone in a pack of the
# next multiple of 256, a 284-token datum (an RL rollout) is 45% padding; in one of 320, 11% (7 such datums: 1.8x
# fewer tokens computed, measured in BENCHMARKS.md). Only long datums, whose widths vary anyway, get these shapes.
LONG_PACK_MULTIPLE = 64
UNPACKED_WIDTH_MULTIPLE = 16


@dataclass
class MicroBatch:
    """Packs of `width` tokens, each holding whole datums one after the other (`packs[k]`: datum indices)."""

    packs: list[list[int]]
    width: int


def _first_fit(lengths: list[int], width: int) -> list[list[int]]:
    """Datum indices packed into sequences of `width` tokens, longest first, each into the first with room."""
    packs: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True):
        fit = next((k for k, free in enumerate(room) if lengths[i] <= free), None)
        if fit is None:
            packs.append([])
            room.append(width)
            fit = len(packs) - 1
        packs[fit].append(i)
        room[fit] -= lengths[i]
    return packs


def micro_batches(lengths: list[int], budget: int, pack: bool = True) -> list[MicroBatch]:
    """Pack datums into sequences of one width (first fit, longest first), and the packs into micro-batches.

    The width is the one of a few (NARROW_PACK_WIDTHS, multiples of PACK_TOKENS) that pads least, so the matmul
    shapes of a step come from a handful (packs x width), the same from step to step: oneDNN keeps a compiled
    kernel and ~1.5 MB per new shape (measured), so with shapes new to every micro-batch a run grew by ~75 MB
    per step, and a linear layer's forward and backward at a new shape took a third longer.
    """
    longest = max(lengths)
    if not pack:
        width = round_up(longest, UNPACKED_WIDTH_MULTIPLE)
        packs = [[i] for i in sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)]
    else:
        widths = [w for w in NARROW_PACK_WIDTHS if w >= longest]
        widest = max(PACK_TOKENS, round_up(longest, PACK_TOKENS))
        if longest > PACK_TOKENS:
            widths += range(round_up(longest, LONG_PACK_MULTIPLE), widest, LONG_PACK_MULTIPLE)
        widths.append(widest)
        # The fewest padded tokens; at a tie the narrower width (less attention per token).
        width, packs = min(
            ((w, _first_fit(lengths, w)) for w in widths), key=lambda c: (len(c[1]) * c[0], c[0])
        )
    per_batch = max(1, budget // width)
    return [MicroBatch(packs[s : s + per_batch], width) for s in range(0, len(packs), per_batch)]


@dataclass
class PackedInputs:
    """A micro-batch's token ids and positions [packs, width], and each datum's flat positions in them."""

    ids: torch.Tensor
    positions: torch.Tensor
    index: torch.Tensor  # [N]: the datums' positions in the flattened [packs * width], datum after datum


def pack_tokens(batch: MicroBatch, tokens: list[list[int]]) -> PackedInputs:
    ids = torch.zeros(len(batch.packs), batch.width, dtype=torch.long)
    positions = torch.zeros(len(batch.packs), batch.width, dtype=torch.long)
    rows: list[torch.Tensor] = []
    for k, pack in enumerate(batch.packs):
        offset = 0
        for i in pack:
            n = len(tokens[i])
            ids[k, offset : offset + n] = torch.tensor(tokens[i])
            # Positions restart at each datum: the model masks attention across datums (packed sequences).
            positions[k, offset : offset + n] = torch.arange(n)
            rows.append(torch.arange(k * batch.width + offset, k * batch.width + offset + n))
            offset += n
        positions[k, offset:] = torch.arange(batch.width - offset)
    return PackedInputs(ids, positions, torch.cat(rows))
