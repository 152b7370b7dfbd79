"""How long things stay in the checkpoint store: a finished session's runs are released (a run folder holding no
checkpoint goes), checkpoints saved with `ttl_seconds` are deleted once expired, unless the engine still uses them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from posttrain.engine.checkpoints import CheckpointRef
from posttrain.engine.models import ModelSource
from posttrain.engine.runtime import LoraSpec, ServedModel
from posttrain.engine.weights import Weights, release_session
from posttrain.util import iso_time


@pytest.fixture
def weights(tiny_model: str, tmp_path: Path) -> Weights:
    base = ServedModel(ModelSource(name="tiny", path=Path(tiny_model)), torch.float32)
    return Weights({"tiny": base}, tmp_path / "checkpoints")


def _folders(weights: Weights) -> list[str]:
    return sorted(p.name for p in weights.store.root.iterdir())


def test_a_finished_session_frees_its_runs_and_removes_the_folders_of_those_without_checkpoints(weights):
    weights.create_run("s1:train:0", "tiny", LoraSpec(rank=2), None)  # e.g. a download's run, export deleted
    weights.create_run("s1:train:1", "tiny", LoraSpec(rank=2), {"k": "v"})
    weights.create_run("s2:train:0", "tiny", LoraSpec(rank=2), None)
    weights.save_state("s1:train:1", "final", None, False, None)
    export = weights.save_external("s1:train:0", "download", 3600, None, None)["path"]
    adapters = {r: weights.runs[r].adapter for r in weights.runs}
    last = weights.runs["s1:train:1"].last_request

    assert weights.store.delete(_ref(export))  # as the cookbook does after the download
    # The emptied kind folder went with the export: the run holds nothing but its run.json.
    assert sorted(p.name for p in (weights.store.root / "s1:train:0").iterdir()) == ["run.json"]
    assert sorted(release_session(weights, "s1")) == ["s1:train:0", "s1:train:1"]

    assert _folders(weights) == ["s1:train:1", "s2:train:0"]  # s2's session goes on: its run stays
    assert set(weights.runs) == {"s2:train:0"}
    peft_adapters = set(weights.models["tiny"].peft.peft_config)
    assert adapters["s2:train:0"] in peft_adapters
    assert not {adapters["s1:train:0"], adapters["s1:train:1"]} & peft_adapters
    # A released run with a checkpoint reads as before: its checkpoint, metadata and last request time.
    view = weights.training_run_view("s1:train:1")
    assert view["user_metadata"] == {"k": "v"} and view["last_checkpoint"]["checkpoint_id"] == "weights/final"
    assert view["last_request_time"] == iso_time(last)
    assert json.loads((weights.store.root / "s1:train:1" / "run.json").read_text())["last_request"] == last
    # The freed model still trains new runs.
    weights.create_run("s3:train:0", "tiny", LoraSpec(rank=2), None)
    weights.save_state("s3:train:0", "again", None, False, None)


def _ref(path: str) -> CheckpointRef:
    run_id, kind, name = path.removeprefix("tinker://").split("/")
    return CheckpointRef(run_id, kind, name)


def test_expired_checkpoints_go_at_the_next_save_and_at_start_but_not_while_used(weights, tmp_path):
    for run_id in ("s1:train:0", "s2:train:0", "s3:train:0"):
        weights.create_run(run_id, "tiny", LoraSpec(rank=2), None)
    short = weights.save_for_sampler("s1:train:0", "short", None, 1, None)["path"]
    kept = weights.save_state("s1:train:0", "kept", None, False, None)["path"]  # no TTL: kept
    sampled = weights.save_for_sampler("s2:train:0", "sampled", None, 1, None)["path"]
    weights.save_for_sampler("s3:train:0", "alone", None, 1, None)  # its run's only checkpoint
    release_session(weights, "s1")
    release_session(weights, "s2")
    release_session(weights, "s3")
    weights.create_sampler("s9:sample:0", None, sampled)  # a sampler still samples from it
    time.sleep(1.1)

    weights.create_run("s4:train:0", "tiny", LoraSpec(rank=2), None)
    weights.save_state("s4:train:0", "new", 1, False, None)  # a save checks the TTLs
    assert not weights.store.exists(_ref(short)) and weights.store.exists(_ref(kept))
    assert weights.store.exists(_ref(sampled))
    assert not (weights.store.root / "s3:train:0").exists()  # its only checkpoint expired: the folder went
    assert weights.store.exists(_ref("tinker://s4:train:0/weights/new"))  # its run is live

    time.sleep(1.1)
    restarted = Weights(weights.models, weights.store.root)  # an engine starting on the store expires too
    assert not restarted.store.exists(_ref(sampled))
    assert not restarted.store.exists(_ref("tinker://s4:train:0/weights/new"))
    assert restarted.store.exists(_ref(kept))
    assert sorted(p.name for p in restarted.store.root.iterdir()) == ["s1:train:0"]
