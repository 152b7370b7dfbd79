"""The served models: base models with LoRA adapters (one per training run), snapshots for sampling.

Everything here runs on the engine's single compute thread (see `engine.py`), so nothing here locks.
One peft model per served base model holds one adapter per training run, plus one "sampling slot" per LoRA
shape into which a snapshot's weights are copied before a sampling batch runs.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

from posttrain.engine.errors import WireError
from posttrain.engine.models import ModelSource, max_context_length
from posttrain.engine.vision import ImageLayout, Part, VisionInputs, has_images, is_vision_config, text_tokens

logger = logging.getLogger(__name__)

LORA_ALPHA = 32  # not on the wire; the value Tinker-compatible servers use
ATTN_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query_key_value", "c_attn", "out_proj")
MLP_NAMES = ("gate_proj", "up_proj", "down_proj", "fc1", "fc2", "c_fc", "c_proj", "w1", "w2", "w3")


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


def _load_frozen(
    path: str | Path, dtype: torch.dtype, device: torch.device
) -> tuple[Any, ImageLayout | None]:
    """The base model, frozen, on `device`; a vision-language model (a vision tower in its config) loads as one,
    with the layout of its images (its own image processor)."""
    config = AutoConfig.from_pretrained(path)
    vision = is_vision_config(config)
    auto = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    model = auto.from_pretrained(path, dtype=dtype).to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, ImageLayout(path, config, model) if vision else None


def _lora_targets(model: Any) -> list[str]:
    """The linear layers LoRA goes on: the language model's only. A vision tower (`visual`) stays frozen, as the
    image embeddings it computes are what the language model learns to read."""
    return [
        n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "visual" not in n.split(".")
    ]


class ServedModel:
    """One base model, loaded once, shared by every training run and sampler on it."""

    def __init__(self, source: ModelSource, dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.name = source.name
        self.path = source.path
        self.dtype = dtype
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(source.path)
        model, self.images = _load_frozen(source.path, dtype, self.device)
        self.model = model
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.max_context = max_context_length(source.path) or 4096
        self.eos_token_ids = self._eos_ids()
        self.peft: PeftModel | None = None
        self.slots: dict[str, int] = {}  # sampling slot adapter -> version of the snapshot loaded in it
        self._linear_names = _lora_targets(model)
        self.plain_head = _head_is_plain(self)
        # Datums holding images run one per forward pass (their M-RoPE positions do not restart), so a
        # vision-language model never packs.
        self.packs_sequences = self.images is None and _keeps_packed_sequences_apart(self)

    def hidden_states(
        self, ids: torch.Tensor, positions: torch.Tensor | None, vision: VisionInputs | None = None
    ) -> torch.Tensor:
        """What `head` turns into logits: the decoder's last hidden states, or the logits themselves.

        `ids` hold packed sequences: where `positions` restart, a new sequence begins, and transformers masks
        attention so that no token sees another sequence's (with no attention mask given, it derives this
        from the positions). Padding after the last sequence is a sequence of its own. With `vision` (one
        sequence holding images) the positions are its M-RoPE ones and the model embeds the images.
        """
        module = self.peft if self.peft is not None else self.model
        images: dict[str, torch.Tensor] = {}
        if vision is not None:
            positions = vision.position_ids.to(self.device)
            images = vision.model_kwargs(self.device, self.dtype)
        if not self.plain_head:
            return module(input_ids=ids, position_ids=positions, use_cache=False, **images).logits
        if self.images is not None:
            # Below the head of a vision-language model: the multimodal model (vision tower + language model).
            return self.model.model(
                input_ids=ids, position_ids=positions, use_cache=False, **images
            ).last_hidden_state
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
        """Free an adapter (a released training run's). The model's last adapter stays, only its gradients
        freed: peft cannot run a model all of whose adapters were deleted (the base model's samples, under
        `disable_adapter`, fail), so at most one stale adapter remains."""
        if self.peft is None or adapter not in self.peft.peft_config:
            return
        others = [a for a in self.peft.peft_config if a != adapter]
        if not others:
            for p in self.adapter_params(adapter):
                p.grad = None
            return
        if adapter in self.peft.active_adapters:
            self.activate(others[0])  # as peft would on deleting it, without its warning
        self.peft.delete_adapter(adapter)
        self.slots.pop(adapter, None)

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

    def lay_out(self, parts: list[Part], where: str) -> tuple[list[int], VisionInputs | None]:
        """A model input's token ids, each image laid out as its image-token positions (see `vision`)."""
        if not has_images(parts):
            return text_tokens(parts), None
        if self.images is None:
            raise WireError(f"{where}: {self.name} is text-only; image chunks need a vision-language model")
        return self.images.lay_out(parts)

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


# Probes of a model's forward pass, run once when it loads.


def _head_is_plain(served: ServedModel) -> bool:
    """Whether logits = output_embeddings(decoder(x).last_hidden_state), so the head can run in chunks.

    True for most causal LMs; false for those that scale or soft-cap logits after the unembedding (their
    logits are then computed whole, as the model computes them).
    """
    try:
        decoder = served.model.get_decoder()
        head = served.model.get_output_embeddings()
        ids = torch.tensor([[1, 2, 3]], device=served.device)
        with torch.no_grad(), served.autocast:
            full = served.model(input_ids=ids, use_cache=False).logits
            split = head(decoder(input_ids=ids, use_cache=False).last_hidden_state)
        return full.shape == split.shape and bool(torch.allclose(full.float(), split.float(), atol=1e-4))
    except Exception:  # noqa: BLE001 - any surprise: fall back to the model's own forward
        logger.info("%s: logits computed whole (the model's head is not a plain unembedding)", served.name)
        return False


def _keeps_packed_sequences_apart(served: ServedModel) -> bool:
    """Whether a sequence packed after another computes as it does alone (attention masked between them).

    transformers derives that mask from positions that restart when no attention mask is given; a model
    that does not would let a datum attend to the one before it, so its datums are never packed.
    """
    first = torch.arange(100, 140, device=served.device) % served.vocab_size
    second = torch.arange(500, 530, device=served.device) % served.vocab_size
    ids = torch.cat([first, second]).unsqueeze(0)
    positions = torch.cat([torch.arange(40), torch.arange(30)]).unsqueeze(0).to(served.device)
    try:
        with torch.no_grad(), served.autocast:
            alone = served.model(input_ids=second.unsqueeze(0), use_cache=False).logits[0].float()
            packed = served.model(input_ids=ids, position_ids=positions, use_cache=False).logits[0, 40:]
            joined = served.model(input_ids=ids, use_cache=False).logits[0, 40:]
    except Exception:  # noqa: BLE001 - any surprise: one datum per sequence, as the model computes it
        logger.info("%s: datums not packed (the model did not take restarting positions)", served.name)
        return False
    # Packed vs alone differ by rounding only (bf16 logits: up to ~1% of their scale); a model that ignores
    # the restart computes the packed sequence exactly as joined to the first.
    apart = float((packed.float() - alone).abs().max()) < 0.1 * float((joined.float() - alone).abs().max())
    if not apart:
        logger.info("%s: datums not packed (attention is not masked between packed sequences)", served.name)
    return apart
