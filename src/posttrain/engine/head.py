"""The unembedding and the loss, chunk by chunk over positions: the full [tokens x vocab] logits never exist."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from posttrain.engine.runtime import ServedModel

# The unembedding runs over this many logits at a time (positions x vocab): 8M fp32 logits are 32 MB, i.e. 170
# positions at a 49k vocabulary. The full [tokens x vocab] logits and their gradient never exist at once. A chunk
# lives with its bf16 logits, fp32 copy, softmax temporaries and gradient (~4x its fp32 size) on top of the whole
# micro-batch's activations: at 32M logits (682 positions) that was ~450 MB of a training step's peak; 170
# positions still make a large matmul.
LOGITS_CHUNK_ELEMENTS = 1 << 23
# The last chunk of the unembedding is padded to a multiple of this many positions, and chunks are a multiple
# of it, so the head's matmul shapes repeat from step to step (see `_micro_batches`).
HEAD_ROW_MULTIPLE = 16


def logits_chunk_tokens(vocab_size: int) -> int:
    """Positions per chunk of the unembedding: its fp32 logits and their gradient stay ~LOGITS_CHUNK_ELEMENTS."""
    override = os.environ.get("POSTTRAIN_LOGITS_CHUNK_TOKENS")
    if override:
        return max(1, int(override))
    rows = LOGITS_CHUNK_ELEMENTS // max(vocab_size, 1) // HEAD_ROW_MULTIPLE * HEAD_ROW_MULTIPLE
    return max(HEAD_ROW_MULTIPLE, rows)


def _padded_rows(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """`x` [n, ...] with zero rows appended up to a multiple of `multiple` rows (a matmul shape seen before)."""
    missing = -x.shape[0] % multiple
    return x if missing == 0 else torch.cat([x, x.new_zeros(missing, *x.shape[1:])])


def head_losses(
    base: ServedModel,
    hidden: torch.Tensor,
    inputs: list[dict[str, torch.Tensor]],
    loss_fn: Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor],
    *,
    train: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the targets and the per-token loss, chunk by chunk over positions; backward when training.

    `hidden` [N, H] holds the final hidden states of the datums' positions, one datum after the other, with
    `inputs[d]` the loss inputs of datum d. Every built-in loss is elementwise in the log-probs, so each chunk's
    loss is known as soon as its log-probs are, and its gradient flows back through the unembedding at once:
    only one chunk's [chunk, vocab] fp32 logits and gradient ever exist, nothing is recomputed, and the
    gradient of `hidden` is then propagated through the rest of the model in one backward call.
    Returns lp and per-token loss as [N, K] float32 (K: the widest target; narrower datums are padded).
    """
    device = hidden.device
    targets = [d["target_tokens"].long() for d in inputs]
    columns = max(1 if t.dim() == 1 else t.shape[1] for t in targets)
    n_total = sum(t.shape[0] for t in targets)
    index = torch.zeros(n_total, columns, dtype=torch.long)
    valid = torch.zeros(n_total, columns, dtype=torch.bool)
    keys = sorted({k for d in inputs for k in d if k != "target_tokens"})
    flat = {k: torch.zeros(n_total, columns) for k in keys}
    start = 0
    for d, t in zip(inputs, targets, strict=True):
        n, k = t.shape[0], (1 if t.dim() == 1 else t.shape[1])
        index[start : start + n, :k] = t.view(n, k)
        valid[start : start + n, :k] = True
        for key in keys:
            value = d.get(key)
            if value is None:  # only `weights` is optional: a datum without them counts every token
                flat[key][start : start + n, :k] = 1.0 if key == "weights" else 0.0
            else:
                flat[key][start : start + n, :k] = value.float().view(n, k)
        start += n
    index, valid = index.to(device), valid.to(device)
    flat = {k: v.to(device) for k, v in flat.items()}
    head_input = hidden.detach().requires_grad_(train)
    lp_out = torch.empty(n_total, columns, dtype=torch.float32, device=device)
    loss_out = torch.empty(n_total, columns, dtype=torch.float32, device=device)
    chunk = logits_chunk_tokens(base.vocab_size)
    for s in range(0, n_total, chunk):
        e = min(s + chunk, n_total)
        with torch.set_grad_enabled(train):
            with base.autocast:
                logits = base.head(_padded_rows(head_input[s:e], HEAD_ROW_MULTIPLE))[: e - s]
            logits32 = logits.float()
            lp = logits32.gather(-1, index[s:e]) - torch.logsumexp(logits32, dim=-1, keepdim=True)
            per_token = loss_fn(lp, {k: v[s:e] for k, v in flat.items()})
            per_token = torch.where(valid[s:e], per_token, torch.zeros_like(per_token))
            if train and per_token.requires_grad:
                per_token.sum().backward()
        lp_out[s:e] = lp.detach()
        loss_out[s:e] = per_token.detach()
        del logits, logits32, lp, per_token
    if train and head_input.grad is not None and hidden.requires_grad:
        hidden.backward(head_input.grad)
    return lp_out, loss_out
