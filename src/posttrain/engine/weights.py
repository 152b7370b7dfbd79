"""Every set of weights the engine knows: the served base models, training runs, samplers and checkpoints.

The training operations here run on the compute thread (the routes submit them through the engine's queue);
the look-ups (`model`, `run`, `create_sampler`) run on the event loop to check a request before it is queued.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch

from posttrain.engine import training
from posttrain.engine.checkpoints import CheckpointRef, CheckpointStore, check_name, parse_tinker_path
from posttrain.engine.errors import WireError
from posttrain.engine.models import ModelSource
from posttrain.engine.runtime import LORA_ALPHA, LoraSpec, ServedModel, Snapshot, SnapshotCache, TrainingRun
from posttrain.engine.stability import StabilityRecords
from posttrain.engine.wire import FwdBwdRequest, encode_forward_backward_output
from posttrain.util import iso_time

logger = logging.getLogger(__name__)


@dataclass
class Sampler:
    sampler_id: str
    base: ServedModel
    model_path: str | None
    snapshot_key: str | None  # None: the base model

    @property
    def weights_key(self) -> tuple[str, str | None]:
        """Requests with the same key decode in one batch."""
        return self.base.name, self.snapshot_key


def load_models(
    sources: list[ModelSource], dtype: torch.dtype, device: torch.device
) -> dict[str, ServedModel]:
    models = {}
    for source in sources:
        logger.info("loading %s from %s (%s on %s)", source.name, source.path, dtype, device)
        models[source.name] = ServedModel(source, dtype, device)
    return models


class Weights:
    def __init__(self, models: dict[str, ServedModel], checkpoint_dir: Path) -> None:
        self.models = models
        self.store = CheckpointStore(checkpoint_dir)
        self.runs: dict[str, TrainingRun] = {}
        self.samplers: dict[str, Sampler] = {}
        self.snapshots = SnapshotCache()
        self.stability = StabilityRecords()
        self.loaded_from: dict[str, str] = {}  # training run -> the checkpoint it was loaded from
        self.expire()

    def model(self, name: str | None) -> ServedModel:
        if name is None or name not in self.models:
            raise WireError(
                f"model {name!r} is not served by this engine; available: {', '.join(self.models)}"
            )
        return self.models[name]

    def run(self, model_id: str) -> TrainingRun:
        run = self.runs.get(model_id)
        if run is None:
            raise WireError(
                f"unknown model_id {model_id!r} (training runs live until the server stops; "
                "resume from a checkpoint with create_training_client_from_state)"
            )
        return run

    # checkpoint lifetimes (on the compute thread, or before the server starts) -----------------------------------
    def expire(self) -> list[CheckpointRef]:
        """Delete the checkpoints whose TTL has passed, but none that this engine still uses: every checkpoint of
        a run it trains, one a run was loaded from, one a sampler samples from. A run folder left with nothing
        then goes too (e.g. a download's export, left behind by a client that crashed)."""
        used = set(self.loaded_from.values()) | {s.model_path for s in self.samplers.values() if s.model_path}
        gone = self.store.expire(lambda ref: ref.run_id in self.runs or ref.tinker_path in used)
        for run_id in sorted({ref.run_id for ref in gone} - set(self.runs)):
            self.store.remove_if_empty(run_id)
        if gone:
            logger.info(
                "expired checkpoints deleted (their ttl_seconds passed): %s", [r.tinker_path for r in gone]
            )
        return gone

    # training operations (on the compute thread) ----------------------------------------------------------------
    def create_run(
        self, model_id: str, base_model: str, spec: LoraSpec, user_metadata: dict | None
    ) -> TrainingRun:
        base = self.model(base_model)
        if spec.rank < 1 or spec.rank > 512:
            raise WireError(f"lora rank must be between 1 and 512, got {spec.rank}")
        if not (spec.train_attn or spec.train_mlp or spec.train_unembed):
            raise WireError("at least one of train_attn, train_mlp, train_unembed must be true")
        adapter = f"run{len(self.runs)}-{uuid.uuid4().hex[:6]}"
        base.add_adapter(adapter, spec)
        run = TrainingRun(
            run_id=model_id,
            base=base,
            spec=spec,
            adapter=adapter,
            optimizer=training.new_optimizer(base.adapter_params(adapter)),
            user_metadata={str(k): str(v) for k, v in (user_metadata or {}).items()},
        )
        self.runs[model_id] = run
        self.store.write_run(model_id, run.info())
        return run

    def forward_backward(self, request: FwdBwdRequest) -> bytes:
        outputs, metrics = training.forward_backward(self.run(request.model_id), request, self.stability)
        return encode_forward_backward_output(outputs, metrics)

    def optim_step(self, model_id: str, adam: dict) -> dict:
        return {"metrics": training.optim_step(self.run(model_id), adam)}

    def save_state(
        self, model_id: str, name: str, ttl: int | None, overwrite: bool, metadata: dict | None
    ) -> dict:
        run = self.run(model_id)
        ref = CheckpointRef(model_id, "weights", check_name(name))
        meta = _meta(run, {"ttl_seconds": ttl, "user_metadata": metadata or {}})
        self.store.save(
            ref, run.adapter_state(), meta, optimizer=run.optimizer.state_dict(), overwrite=overwrite
        )
        self.expire()  # each save checks the TTLs: a long-lived engine keeps to them without a timer
        return {"path": ref.tinker_path, "type": "save_weights"}

    def save_external(
        self, model_id: str, name: str, ttl: int | None, recipients: list[str] | None, metadata: dict | None
    ) -> dict:
        """The adapter as Tinker exports it for download (`adapter_model.safetensors` + `adapter_config.json`,
        Tinker's parameter names), each file age-encrypted to `recipients` when given."""
        run = self.run(model_id)
        ref = CheckpointRef(model_id, "external_weights", check_name(name))
        files = external_adapter_files(run.adapter_state(), run.spec.rank, run.base.name)
        if recipients:
            files = {f"{n}.age": _age_encrypt(data, recipients) for n, data in files.items()}
        meta = _meta(run, {"ttl_seconds": ttl, "user_metadata": metadata or {}})
        size = self.store.save_files(ref, files, meta, overwrite=True)
        self.expire()
        return {"path": ref.tinker_path, "size_bytes": size, "type": "save_weights_external"}

    def save_for_sampler(
        self, model_id: str, name: str | None, sampler_seq: int | None, ttl: int | None, metadata: dict | None
    ) -> dict:
        run = self.run(model_id)
        snapshot = Snapshot(run.spec, run.adapter_state())
        if name is None:
            # Ephemeral: kept in memory only, addressed through a sampling session.
            sampler_id = (
                f"{model_id}:sampler:{sampler_seq if sampler_seq is not None else uuid.uuid4().hex[:8]}"
            )
            key = f"ephemeral:{sampler_id}:{time.time_ns()}"
            self.snapshots.put(key, snapshot)
            self.samplers[sampler_id] = Sampler(sampler_id, run.base, None, key)
            return {"sampling_session_id": sampler_id, "type": "save_weights_for_sampler"}
        ref = CheckpointRef(model_id, "sampler_weights", check_name(name))
        meta = _meta(run, {"ttl_seconds": ttl, "user_metadata": metadata or {}})
        self.store.save(ref, snapshot.weights, meta, overwrite=True)
        self.snapshots.put(ref.tinker_path, snapshot)
        self.expire()
        return {"path": ref.tinker_path, "type": "save_weights_for_sampler"}

    def load(
        self, model_id: str, path: str, with_optimizer: bool, base_model: str | None, metadata: dict | None
    ) -> dict:
        ref = parse_tinker_path(path)
        _not_an_export(ref)
        adapter, meta, optimizer = self.store.load(ref, with_optimizer)
        if base_model and base_model != meta["base_model"]:
            raise WireError(f"{path} was trained on {meta['base_model']}, not {base_model}")
        run = self.runs.get(model_id)
        if run is None:
            run = self.create_run(model_id, meta["base_model"], LoraSpec.from_dict(meta["lora"]), metadata)
        elif run.steps > 0:
            raise WireError("load_weights is only allowed as the first request of a training client")
        from peft.utils import set_peft_model_state_dict

        assert run.base.peft is not None
        set_peft_model_state_dict(run.base.peft, adapter, adapter_name=run.adapter)
        if optimizer is not None:
            run.optimizer.load_state_dict(optimizer)
        run.steps = int(meta.get("step", 0))
        self.loaded_from[model_id] = ref.tinker_path
        return {"path": path, "model_id": model_id, "type": "load_weights"}

    # samplers ----------------------------------------------------------------------------------------------------
    def create_sampler(self, sampler_id: str, base_model: str | None, model_path: str | None) -> Sampler:
        if model_path:
            ref = parse_tinker_path(model_path)
            _not_an_export(ref)
            meta = self.store.meta(ref)
            if base_model and base_model != meta["base_model"]:
                raise WireError(f"{model_path} was trained on {meta['base_model']}, not {base_model}")
            sampler = Sampler(sampler_id, self.model(meta["base_model"]), model_path, ref.tinker_path)
        else:
            sampler = Sampler(sampler_id, self.model(base_model), None, None)
        self.samplers[sampler_id] = sampler
        return sampler

    def snapshot(self, sampler: Sampler) -> Snapshot | None:
        """The adapter a sampler decodes with (None: the base model), from memory or its checkpoint."""
        if sampler.snapshot_key is None:
            return None
        snap = self.snapshots.get(sampler.snapshot_key)
        if snap is not None:
            return snap
        if sampler.snapshot_key.startswith("ephemeral:"):
            raise WireError(
                f"sampler {sampler.sampler_id}: its weights were evicted; save them with a name to keep them"
            )
        weights, meta, _ = self.store.load(parse_tinker_path(sampler.snapshot_key), with_optimizer=False)
        snap = Snapshot(LoraSpec.from_dict(meta["lora"]), weights)
        self.snapshots.put(sampler.snapshot_key, snap)
        return snap

    # REST views --------------------------------------------------------------------------------------------------
    def training_run_view(self, run_id: str) -> dict:
        live = self.runs.get(run_id)
        info = live.info() if live else self.store.read_run(run_id)
        if info is None:
            raise KeyError(run_id)
        checkpoints = self.store.list(run_id)
        training = [c for c in checkpoints if c["checkpoint_type"] == "training"]
        sampler = [c for c in checkpoints if c["checkpoint_type"] == "sampler"]
        last = live.last_request if live else info.get("last_request", info.get("created", time.time()))
        return {
            "training_run_id": run_id,
            "base_model": info["base_model"],
            "model_owner": "local",
            "is_lora": True,
            "corrupted": False,
            "lora_rank": info["lora"]["rank"],
            "last_request_time": iso_time(last),
            "last_checkpoint": training[-1] if training else None,
            "last_sampler_checkpoint": sampler[-1] if sampler else None,
            "user_metadata": info.get("user_metadata") or None,
        }

    def run_ids(self) -> list[str]:
        return sorted(set(self.store.list_runs()) | set(self.runs))


def release_session(weights: Weights, session_id: str) -> list[str]:
    """Forget the training runs of a finished session (the SDK's `close`: Tinker refuses its clients' requests
    from then on), on the compute thread; returns their ids."""
    released = [run_id for run_id in list(weights.runs) if run_id.startswith(f"{session_id}:")]
    for run_id in released:
        _release_run(weights, run_id)
    return released


def _release_run(weights: Weights, run_id: str) -> None:
    """Free a run's adapter and optimizer state. Its folder stays while it holds a checkpoint (with the run's last
    request time, for the REST views); one holding nothing else goes: the run the cookbook's `weights.download`
    creates only to export a checkpoint, its export deleted, would otherwise stay behind after every download."""
    run = weights.runs.pop(run_id)
    weights.loaded_from.pop(run_id, None)
    run.base.remove_adapter(run.adapter)
    if weights.store.run_dir(run_id).is_dir() and not weights.store.remove_if_empty(run_id):
        weights.store.write_run(run_id, {**run.info(), "last_request": run.last_request})


# The name Tinker's adapters give the unembedding (the cookbook's weights module maps it back to lm_head).
_PEFT_HEAD, _TINKER_HEAD = "base_model.model.lm_head.", "base_model.model.model.unembed_tokens."


def _not_an_export(ref: CheckpointRef) -> None:
    if ref.kind == "external_weights":
        raise WireError(
            f"{ref.tinker_path} is an export for download (get_external_weights_urls), not weights to load: "
            f"use tinker://{ref.run_id}/weights/NAME or sampler_weights/NAME"
        )


def external_adapter_files(state: dict[str, torch.Tensor], rank: int, base_model: str) -> dict[str, bytes]:
    tensors = {k.replace(_PEFT_HEAD, _TINKER_HEAD): v.contiguous() for k, v in state.items()}
    config = {"r": rank, "lora_alpha": LORA_ALPHA, "base_model_name_or_path": base_model, "peft_type": "LORA"}
    return {
        "adapter_model.safetensors": safetensors.torch.save(tensors),
        "adapter_config.json": (json.dumps(config, indent=2) + "\n").encode(),
    }


def _age_encrypt(data: bytes, recipients: list[str]) -> bytes:
    import pyrage

    keys = []
    for r in recipients:
        kind = pyrage.ssh if r.startswith(("ssh-", "ecdsa-")) else pyrage.x25519
        try:
            keys.append(kind.Recipient.from_str(r))
        except pyrage.RecipientError as exc:
            raise WireError(
                f"age_encryption_recipients: {r[:20]!r} is not an age or SSH public key ({exc})"
            ) from None
    return pyrage.encrypt(data, keys)


def _meta(run: TrainingRun, extra: dict) -> dict:
    return {"base_model": run.base.name, "lora": run.spec.__dict__, "step": run.steps, **extra}
