"""The compute side of the engine: base models with LoRA adapters, training steps, snapshots for sampling.

Everything here runs on the engine's single compute thread (see `engine.py`), so nothing here locks.
One peft model per served base model holds one adapter per training run, plus one "sampling slot" per LoRA
shape into which a snapshot's weights are copied before a sampling batch runs.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.engine import stability
from posttrain.engine.losses import NEEDS_PROVENANCE, SEQUENCE_STATISTICS, check_inputs, get_loss
from posttrain.engine.models import ModelSource, max_context_length
from posttrain.engine.wire import FwdBwdRequest, WireError
from posttrain.util import round_up

logger = logging.getLogger(__name__)

LORA_ALPHA = 32  # not on the wire; the value Tinker-compatible servers use
ATTN_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query_key_value", "c_attn", "out_proj")
MLP_NAMES = ("gate_proj", "up_proj", "down_proj", "fc1", "fc2", "c_fc", "c_proj", "w1", "w2", "w3")
# Tokens per micro-batch in a 2-byte compute dtype, padding included (half as many in fp32). It bounds the
# activations kept for backward (about 1 MB per token for SmolLM2-135M in bf16), so the peak memory of a step
# does not grow with the batch. The default run (bf16, 2 cores, glibc's own allocator policy, two compute threads
# then, BENCHMARKS.md section 00): 512 tokens 137 s wall, engine peak 2613 MB; 1024 tokens 123 s, 3144 MB.
TRAIN_TOKEN_BUDGET = 512
# Datums are packed into sequences of a multiple of this many tokens (see `_micro_batches`), or of 192 where that
# pads less: 32 datums of 48 tokens fill 8 packs of 192 exactly but take 7 of 256 (14% padding); the default
# run's rows (45-126 tokens) pad 11% at 256, 9% with the choice. More narrow widths (128-224) padded 8% there but
# made more distinct matmul shapes, each with its own kernel and memory in oneDNN (engine peak 2638 vs 2494 MB
# in one default run each). For a model that cannot keep packed sequences apart, each datum is padded to the longest,
# rounded up to a multiple of 16.
PACK_TOKENS = 256
NARROW_PACK_WIDTHS = (192,)
UNPACKED_WIDTH_MULTIPLE = 16
# The unembedding runs over this many logits at a time (positions x vocab): 8M fp32 logits are 32 MB, i.e. 170
# positions at a 49k vocabulary. The full [tokens x vocab] logits and their gradient never exist at once. A chunk
# lives with its bf16 logits, fp32 copy, softmax temporaries and gradient (~4x its fp32 size) on top of the whole
# micro-batch's activations: at 32M logits (682 positions) that was ~450 MB of a training step's peak; 170
# positions still make a large matmul.
LOGITS_CHUNK_ELEMENTS = 1 << 23
# The last chunk of the unembedding is padded to a multiple of this many positions, and chunks are a multiple
# of it, so the head's matmul shapes repeat from step to step (see `_micro_batches`).
HEAD_ROW_MULTIPLE = 16


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    seed: int | None = None
    train_mlp: bool = True
    train_attn: bool = True
    train_unembed: bool = True

    @property
    def shape_key(self) -> str:
        return f"r{self.rank}-m{int(self.train_mlp)}a{int(self.train_attn)}u{int(self.train_unembed)}"

    @classmethod
    def from_dict(cls, d: dict) -> LoraSpec:
        return cls(
            rank=int(d["rank"]),
            seed=d.get("seed"),
            train_mlp=bool(d.get("train_mlp", True)),
            train_attn=bool(d.get("train_attn", True)),
            train_unembed=bool(d.get("train_unembed", True)),
        )


_snapshot_versions = itertools.count(1)


@dataclass
class Snapshot:
    """Adapter weights frozen for sampling (None = the base model itself)."""

    spec: LoraSpec
    weights: dict[str, torch.Tensor]
    # Identifies these exact weights in a sampling slot. A key such as a tinker:// path is not enough: saving a
    # sampler checkpoint again under the same name must not leave the old weights loaded in the slot.
    version: int = field(default_factory=lambda: next(_snapshot_versions))


@dataclass
class TrainingRun:
    run_id: str
    base: ServedModel
    spec: LoraSpec
    adapter: str
    optimizer: torch.optim.AdamW
    user_metadata: dict[str, str] = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    last_request: float = field(default_factory=time.time)
    steps: int = 0

    def params(self) -> list[torch.nn.Parameter]:
        return self.base.adapter_params(self.adapter)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {
            k: v.detach().to("cpu", copy=True)
            for k, v in get_peft_model_state_dict(
                self.base.peft, adapter_name=self.adapter, save_embedding_layers=False
            ).items()
        }

    def info(self) -> dict[str, Any]:
        return {
            "base_model": self.base.name,
            "lora": asdict(self.spec),
            "user_metadata": self.user_metadata,
            "created": self.created,
        }


class ServedModel:
    """One base model, loaded once, shared by every training run and sampler on it."""

    def __init__(self, source: ModelSource, dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.name = source.name
        self.path = source.path
        self.dtype = dtype
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(source.path)
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype).to(self.device)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.max_context = max_context_length(source.path) or 4096
        self.eos_token_ids = self._eos_ids()
        self.peft: PeftModel | None = None
        self.slots: dict[str, int] = {}  # sampling slot adapter -> version of the snapshot loaded in it
        self._linear_names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        self.plain_head = self._head_is_plain()
        self.packs_sequences = self._keeps_packed_sequences_apart()

    def _head_is_plain(self) -> bool:
        """Whether logits = output_embeddings(decoder(x).last_hidden_state), so the head can run in chunks.

        True for most causal LMs; false for those that scale or soft-cap logits after the unembedding (their
        logits are then computed whole, as the model computes them).
        """
        try:
            decoder = self.model.get_decoder()
            head = self.model.get_output_embeddings()
            ids = torch.tensor([[1, 2, 3]], device=self.device)
            with torch.no_grad(), self.autocast:
                full = self.model(input_ids=ids, use_cache=False).logits
                split = head(decoder(input_ids=ids, use_cache=False).last_hidden_state)
            return full.shape == split.shape and bool(torch.allclose(full.float(), split.float(), atol=1e-4))
        except Exception:  # noqa: BLE001 - any surprise: fall back to the model's own forward
            logger.info("%s: logits computed whole (the model's head is not a plain unembedding)", self.name)
            return False

    def _keeps_packed_sequences_apart(self) -> bool:
        """Whether a sequence packed after another computes as it does alone (attention masked between them).

        transformers derives that mask from positions that restart when no attention mask is given; a model
        that does not would let a datum attend to the one before it, so its datums are never packed.
        """
        first = torch.arange(100, 140, device=self.device) % self.vocab_size
        second = torch.arange(500, 530, device=self.device) % self.vocab_size
        ids = torch.cat([first, second]).unsqueeze(0)
        positions = torch.cat([torch.arange(40), torch.arange(30)]).unsqueeze(0).to(self.device)
        try:
            with torch.no_grad(), self.autocast:
                alone = self.model(input_ids=second.unsqueeze(0), use_cache=False).logits[0].float()
                packed = self.model(input_ids=ids, position_ids=positions, use_cache=False).logits[0, 40:]
                joined = self.model(input_ids=ids, use_cache=False).logits[0, 40:]
        except Exception:  # noqa: BLE001 - any surprise: one datum per sequence, as the model computes it
            logger.info("%s: datums not packed (the model did not take restarting positions)", self.name)
            return False
        # Packed vs alone differ by rounding only (bf16 logits: up to ~1% of their scale); a model that ignores
        # the restart computes the packed sequence exactly as joined to the first.
        apart = float((packed.float() - alone).abs().max()) < 0.1 * float(
            (joined.float() - alone).abs().max()
        )
        if not apart:
            logger.info("%s: datums not packed (attention is not masked between packed sequences)", self.name)
        return apart

    def hidden_states(self, ids: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        """What `head` turns into logits: the decoder's last hidden states, or the logits themselves.

        `ids` hold packed sequences: where `positions` restart, a new sequence begins, and transformers masks
        attention so that no token sees another sequence's (with no attention mask given, it derives this
        from the positions). Padding after the last sequence is a sequence of its own.
        """
        module = self.peft if self.peft is not None else self.model
        if not self.plain_head:
            return module(input_ids=ids, position_ids=positions, use_cache=False).logits
        # The decoder of the (peft-injected) model: LoRA layers live inside it, with the active adapter.
        return self.model.get_decoder()(
            input_ids=ids, position_ids=positions, use_cache=False
        ).last_hidden_state

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self.plain_head:
            return hidden
        return self.model.get_output_embeddings()(hidden)

    def _eos_ids(self) -> list[int]:
        ids: set[int] = set()
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        for value in eos if isinstance(eos, list) else [eos]:
            if isinstance(value, int):
                ids.add(value)
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return sorted(ids)

    @property
    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype in (torch.bfloat16, torch.float16):
            return torch.autocast(self.device.type, dtype=self.dtype)
        return contextlib.nullcontext()

    def target_modules(self, spec: LoraSpec) -> list[str]:
        targets = []
        for name in self._linear_names:
            leaf = name.rsplit(".", 1)[-1]
            if (spec.train_attn and leaf in ATTN_NAMES) or (spec.train_mlp and leaf in MLP_NAMES):
                targets.append(name)
            elif spec.train_unembed and leaf == "lm_head":
                targets.append(name)
        if not targets:
            raise WireError(f"{self.name}: no linear layers match train_attn/train_mlp/train_unembed")
        return targets

    def add_adapter(self, adapter: str, spec: LoraSpec, trainable: bool = True) -> None:
        config = LoraConfig(
            r=spec.rank,
            lora_alpha=LORA_ALPHA,
            lora_dropout=0.0,
            target_modules=self.target_modules(spec),
            bias="none",
        )
        # The seed makes the LoRA A initialisation reproducible (B starts at zero, so the model starts as the base).
        with torch.random.fork_rng(), warnings.catch_warnings():
            # With train_unembed on a tied-embedding model, peft warns that the lm_head adapter is not tied to the
            # input embedding. That is what Tinker's train_unembed means (a LoRA on the unembedding only), and
            # adapters are never merged into the shared base weight, so the warning does not apply.
            warnings.filterwarnings("ignore", message=r".*tie_word_embeddings=True.*", category=UserWarning)
            torch.manual_seed(spec.seed if spec.seed is not None else int(time.time_ns() % 2**31))
            if self.peft is None:
                self.peft = get_peft_model(self.model, config, adapter_name=adapter)
            else:
                self.peft.add_adapter(adapter, config)
        for p in self.adapter_params(adapter, trainable_only=False):
            if trainable:
                p.data = p.data.float()  # LoRA weights and Adam state stay in fp32 whatever the compute dtype
            else:
                # A sampling slot holds weights as autocast would cast them at every matmul (the same rounding,
                # so the same results), which spares those casts: 422 per forward pass of SmolLM2.
                p.data = p.data.to(self.dtype)
            p.requires_grad_(trainable)
        if self.dtype != torch.float32:
            # Under autocast the LoRA matmuls run in the compute dtype whatever their input's dtype, so peft's
            # cast of each input to the fp32 LoRA weights' dtype only keeps an fp32 copy of it alive for
            # backward (a third of the activation memory) without changing a single result.
            for module in self.peft.modules():
                if hasattr(module, "cast_input_dtype_enabled"):
                    module.cast_input_dtype_enabled = False

    def adapter_params(self, adapter: str, trainable_only: bool = False) -> list[torch.nn.Parameter]:
        assert self.peft is not None
        marker = f".{adapter}."
        return [p for n, p in self.peft.named_parameters() if marker in n and "lora_" in n]

    def remove_adapter(self, adapter: str) -> None:
        if self.peft is not None and adapter in self.peft.peft_config:
            self.peft.delete_adapter(adapter)

    def activate(self, adapter: str) -> None:
        assert self.peft is not None
        self.peft.base_model.set_adapter(adapter)
        self.peft.active_adapter = adapter

    @contextlib.contextmanager
    def sampling_model(self, snapshot: Snapshot | None):
        """Yield a module whose forward is the base model with the snapshot's adapter (or none)."""
        if snapshot is None:
            if self.peft is None:
                yield self.model
            else:
                with self.peft.disable_adapter():
                    yield self.peft
            return
        slot = f"sample-{snapshot.spec.shape_key}"
        if self.peft is None or slot not in self.peft.peft_config:
            self.add_adapter(slot, snapshot.spec, trainable=False)
        assert self.peft is not None
        if self.slots.get(slot) != snapshot.version:
            result = set_peft_model_state_dict(self.peft, snapshot.weights, adapter_name=slot)
            if result.unexpected_keys:
                raise WireError(
                    f"sampler weights do not fit {self.name}: unexpected {result.unexpected_keys[:3]}"
                )
            self.slots[slot] = snapshot.version
        self.activate(slot)
        yield self.peft

    def check_tokens(self, tokens: list[int] | torch.Tensor, where: str) -> None:
        t = torch.as_tensor(tokens)
        if t.numel() == 0:
            raise WireError(f"{where}: no tokens")
        bad = (t < 0) | (t >= self.vocab_size)
        if bool(bad.any()):
            value = int(t[bad][0])
            raise WireError(
                f"{where}: token id {value} is outside the vocabulary of {self.name} (size {self.vocab_size})"
            )


@dataclass
class _MicroBatch:
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


def _micro_batches(lengths: list[int], budget: int, pack: bool = True) -> list[_MicroBatch]:
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
        widths.append(max(PACK_TOKENS, round_up(longest, PACK_TOKENS)))
        # The fewest padded tokens; at a tie the narrower width (less attention per token).
        width, packs = min(
            ((w, _first_fit(lengths, w)) for w in widths), key=lambda c: (len(c[1]) * c[0], c[0])
        )
    per_batch = max(1, budget // width)
    return [_MicroBatch(packs[s : s + per_batch], width) for s in range(0, len(packs), per_batch)]


def forward_backward(
    run: TrainingRun, request: FwdBwdRequest, records: stability.StabilityRecords | None = None
) -> tuple[list[dict[str, np.ndarray]], dict[str, float]]:
    base = run.base
    loss_fn = get_loss(request.loss_fn)
    if not request.data:
        raise WireError("forward_backward: no data")
    for i, datum in enumerate(request.data):
        base.check_tokens(datum.tokens, f"datum {i} model_input")
        check_inputs(request.loss_fn, i, len(datum.tokens), datum.inputs)
        base.check_tokens(datum.inputs["target_tokens"], f"datum {i} target_tokens")
        if len(datum.tokens) > base.max_context:
            raise WireError(
                f"datum {i}: {len(datum.tokens)} tokens exceed the context length {base.max_context}"
            )
        _add_provenance_inputs(request, i, records or stability.StabilityRecords())
    base.activate(run.adapter)
    run.last_request = time.time()
    outputs: list[dict[str, np.ndarray]] = [{} for _ in request.data]
    total = 0.0
    lengths = [len(d.tokens) for d in request.data]
    train = not request.forward_only
    assert base.peft is not None
    budget = TRAIN_TOKEN_BUDGET * 2 // base.dtype.itemsize
    for batch in _micro_batches(lengths, budget, pack=base.packs_sequences):
        group = [i for pack in batch.packs for i in pack]
        ids = torch.zeros(len(batch.packs), batch.width, dtype=torch.long)
        positions = torch.zeros(len(batch.packs), batch.width, dtype=torch.long)
        rows: list[torch.Tensor] = []  # each datum's flat positions in [packs * width]
        for k, pack in enumerate(batch.packs):
            offset = 0
            for i in pack:
                n = lengths[i]
                ids[k, offset : offset + n] = torch.tensor(request.data[i].tokens)
                # Positions restart at each datum: the model masks attention across datums (packed sequences).
                positions[k, offset : offset + n] = torch.arange(n)
                rows.append(torch.arange(k * batch.width + offset, k * batch.width + offset + n))
                offset += n
            positions[k, offset:] = torch.arange(batch.width - offset)
        index = torch.cat(rows).to(base.device)
        with torch.set_grad_enabled(train), base.autocast:
            packed = positions.to(base.device) if base.packs_sequences else None
            hidden = base.hidden_states(ids.to(base.device), packed)
            # The datums' positions only, datum after datum: [N, hidden]
            hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)
        if request.loss_fn in SEQUENCE_STATISTICS:
            _add_sequence_statistics(base, hidden, [request.data[i].inputs for i in group], request.loss_fn)
        lp, per_token = head_losses(
            base,
            hidden,
            [request.data[i].inputs for i in group],
            lambda lp, inputs: loss_fn(lp, inputs, request.loss_fn_config),
            train=train,
        )
        start = 0
        for i in group:
            n = lengths[i]
            target = request.data[i].inputs["target_tokens"]
            columns = 1 if target.dim() == 1 else target.shape[1]
            datum_lp = lp[start : start + n, :columns]
            datum_loss = per_token[start : start + n, :columns]
            if target.dim() == 1:
                datum_lp, datum_loss = datum_lp[:, 0], datum_loss[:, 0]
            start += n
            total += float(datum_loss.sum())
            outputs[i] = {"logprobs": datum_lp.cpu().numpy(), "elementwise_loss": datum_loss.cpu().numpy()}
        del hidden
    return outputs, {"loss:sum": total}


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


class SnapshotCache:
    """In-memory snapshots for sampling: ephemeral ones and ones read from disk, least recently used dropped."""

    def __init__(self, capacity: int = 24):
        self.capacity = capacity
        self._items: OrderedDict[str, Snapshot] = OrderedDict()

    def put(self, key: str, snapshot: Snapshot) -> None:
        self._items[key] = snapshot
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, key: str) -> Snapshot | None:
        snap = self._items.get(key)
        if snap is not None:
            self._items.move_to_end(key)
        return snap


def model_dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))
