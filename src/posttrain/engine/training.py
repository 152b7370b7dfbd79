"""A training step on the compute thread: forward_backward over packed micro-batches, and the optimizer step."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch

from posttrain.engine import stability
from posttrain.engine.errors import WireError
from posttrain.engine.head import head_losses
from posttrain.engine.losses import NEEDS_PROVENANCE, SEQUENCE_STATISTICS, check_inputs, get_loss
from posttrain.engine.packing import MicroBatch, PackedInputs, micro_batches, pack_tokens
from posttrain.engine.runtime import ServedModel, TrainingRun
from posttrain.engine.vision import VisionInputs
from posttrain.engine.wire import FwdBwdRequest

# Tokens per micro-batch in a 2-byte compute dtype, padding included (half as many in fp32). It bounds the
# activations kept for backward (about 1 MB per token for SmolLM2-135M in bf16), so the peak memory of a step
# does not grow with the batch. The default run (bf16, 2 cores, glibc's own allocator policy, two compute threads
# then, BENCHMARKS.md section 00): 512 tokens 137 s wall, engine peak 2613 MB; 1024 tokens 123 s, 3144 MB.
TRAIN_TOKEN_BUDGET = 512


def forward_backward(
    run: TrainingRun, request: FwdBwdRequest, records: stability.StabilityRecords | None = None
) -> tuple[list[dict[str, np.ndarray]], dict[str, float]]:
    """Each datum's log-probs and per-token loss; the gradients accumulate on the run's adapter unless
    `forward_only`. Datums are packed into micro-batches of TRAIN_TOKEN_BUDGET tokens (see `packing`)."""
    base = run.base
    _check(request, base, records or stability.StabilityRecords())
    base.activate(run.adapter)
    run.last_request = time.time()
    outputs: list[dict[str, np.ndarray]] = [{} for _ in request.data]
    tokens = [d.tokens for d in request.data]
    assert base.peft is not None
    budget = TRAIN_TOKEN_BUDGET * 2 // base.dtype.itemsize
    for batch in _micro_batches(base, request, budget):
        group = [i for pack in batch.packs for i in pack]
        vision = request.data[group[0]].vision if base.images is not None else None
        hidden = _hidden_states(base, pack_tokens(batch, tokens), not request.forward_only, vision)
        lp, per_token = _losses(base, hidden, request, group)
        start = 0
        for i in group:
            n = len(tokens[i])
            outputs[i] = _datum_output(
                lp[start : start + n], per_token[start : start + n], request.data[i].inputs
            )
            start += n
        del hidden
    return outputs, {"loss:sum": sum(float(o["elementwise_loss"].sum()) for o in outputs)}


def _check(request: FwdBwdRequest, base: ServedModel, records: stability.StabilityRecords) -> None:
    """Every datum checked (and given its provenance inputs) before any computation starts."""
    get_loss(request.loss_fn)
    if not request.data:
        raise WireError("forward_backward: no data")
    for i, datum in enumerate(request.data):
        if datum.parts is not None:  # images: their token positions are known once the model lays them out
            datum.tokens, datum.vision = base.lay_out(datum.parts, f"datum {i} model_input")
        base.check_tokens(datum.tokens, f"datum {i} model_input")
        check_inputs(request.loss_fn, i, len(datum.tokens), datum.inputs)
        base.check_tokens(datum.inputs["target_tokens"], f"datum {i} target_tokens")
        if len(datum.tokens) > base.max_context:
            raise WireError(
                f"datum {i}: {len(datum.tokens)} tokens exceed the context length {base.max_context}"
            )
        _add_provenance_inputs(request, i, records)


def _micro_batches(base: ServedModel, request: FwdBwdRequest, budget: int) -> list[MicroBatch]:
    """Packed micro-batches; for a vision-language model one datum each, unpadded (see `_hidden_states`)."""
    tokens = [d.tokens for d in request.data]
    if base.images is not None:
        return [MicroBatch([[i]], len(t)) for i, t in enumerate(tokens)]
    return micro_batches([len(t) for t in tokens], budget, pack=base.packs_sequences)


def _hidden_states(
    base: ServedModel, packed: PackedInputs, train: bool, vision: VisionInputs | None = None
) -> torch.Tensor:
    """The final hidden states of the datums' positions only, datum after datum: [N, hidden].

    `vision`: the images of the micro-batch's one datum (a vision-language model runs one datum per forward
    pass: the image embeddings and M-RoPE positions are per sequence, and one sequence needs no padding)."""
    with torch.set_grad_enabled(train), base.autocast:
        positions = packed.positions.to(base.device) if base.packs_sequences else None
        hidden = base.hidden_states(packed.ids.to(base.device), positions, vision)
        return hidden.reshape(-1, hidden.shape[-1]).index_select(0, packed.index.to(base.device))


def _losses(
    base: ServedModel, hidden: torch.Tensor, request: FwdBwdRequest, group: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = [request.data[i].inputs for i in group]
    if request.loss_fn in SEQUENCE_STATISTICS:
        _add_sequence_statistics(base, hidden, inputs, request.loss_fn)
    loss_fn = get_loss(request.loss_fn)
    return head_losses(
        base,
        hidden,
        inputs,
        lambda lp, chunk_inputs: loss_fn(lp, chunk_inputs, request.loss_fn_config),
        train=not request.forward_only,
    )


def _datum_output(
    lp: torch.Tensor, per_token: torch.Tensor, inputs: dict[str, torch.Tensor]
) -> dict[str, np.ndarray]:
    """One datum's rows of the [N, K] results, cut to its own target's shape ([n] or [n, k])."""
    target = inputs["target_tokens"]
    columns = 1 if target.dim() == 1 else target.shape[1]
    lp, per_token = lp[:, :columns], per_token[:, :columns]
    if target.dim() == 1:
        lp, per_token = lp[:, 0], per_token[:, 0]
    return {"logprobs": lp.cpu().numpy(), "elementwise_loss": per_token.cpu().numpy()}


def _add_provenance_inputs(request: FwdBwdRequest, index: int, records: stability.StabilityRecords) -> None:
    """Where the datum's tokens were sampled, as per-token inputs of the losses that weigh whole sequences:
    `sampled` (a mask), and for stable_reinforce `sampler_logprobs` from the sampling-time records."""
    if request.loss_fn not in SEQUENCE_STATISTICS:
        return
    datum = request.data[index]
    target = datum.inputs["target_tokens"]
    if request.loss_fn not in NEEDS_PROVENANCE:
        if datum.target_spans is not None:
            datum.inputs["sampled"] = stability.sampled_mask(datum.target_spans, target.shape[0])
        return
    if datum.target_spans is None:
        raise WireError(
            f"datum {index}: loss_fn {request.loss_fn!r} needs provenance (Datum.with_provenance, naming the "
            "sampled sequences by their sequence_id) on every datum"
        )
    session = stability.session_of(request.model_id)
    sampler_lp, sampled = stability.sampled_inputs(records, datum.target_spans, target, session, index)
    if bool(((datum.inputs["advantages"] != 0) & (sampled == 0)).any()):
        raise WireError(
            f"datum {index}: loss_fn {request.loss_fn!r} takes nonzero advantages on sampled tokens only; "
            "the provenance says some are prompt tokens"
        )
    datum.inputs["sampler_logprobs"], datum.inputs["sampled"] = sampler_lp, sampled


def _add_sequence_statistics(
    base: ServedModel, hidden: torch.Tensor, inputs: list[dict[str, torch.Tensor]], loss_fn: str
) -> None:
    """A first, gradient-free pass through the unembedding for the log-probs each datum's statistic needs."""
    lp, _ = head_losses(base, hidden, inputs, lambda lp, _: torch.zeros_like(lp), train=False)
    start = 0
    for datum in inputs:
        n = datum["target_tokens"].shape[0]
        datum["sequence_log_ratio"] = SEQUENCE_STATISTICS[loss_fn](lp[start : start + n, 0].cpu(), datum)
        start += n


def optim_step(run: TrainingRun, adam: dict[str, Any]) -> dict[str, float]:
    params = run.params()
    lr = float(adam.get("learning_rate", 1e-4))
    if not math.isfinite(lr) or lr < 0:
        raise WireError(f"optim_step: learning_rate must be a non-negative number, got {lr}")
    grads = [p.grad for p in params if p.grad is not None]
    norm = (
        float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        if grads
        else 0.0
    )
    clip = float(adam.get("grad_clip_norm") or 0.0)
    if clip > 0 and grads:
        torch.nn.utils.clip_grads_with_norm_(params, clip, torch.tensor(norm))
    for group in run.optimizer.param_groups:
        group["lr"] = lr
        group["betas"] = (float(adam.get("beta1", 0.9)), float(adam.get("beta2", 0.95)))
        group["eps"] = float(adam.get("eps", 1e-12))
        group["weight_decay"] = float(adam.get("weight_decay", 0.0))
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.steps += 1
    run.last_request = time.time()
    return {"grad_norm:mean": norm, "learning_rate:mean": lr}


def new_optimizer(params: list[torch.nn.Parameter]) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)
