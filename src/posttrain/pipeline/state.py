"""What a run knows so far: written to summary.json even when the run stops part-way."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.config.run import RunSettings
from posttrain.pipeline import results
from posttrain.pipeline.evaluation.guard import GuardSet
from posttrain.pipeline.methods import TrainingStage
from posttrain.pipeline.methods.length import Length
from posttrain.pipeline.setup import plan


@dataclass(frozen=True)
class Chosen:
    """What the run chose once the service was up: the renderer and the learning rate, each with its source."""

    renderer: str
    renderer_source: str
    learning_rate: float
    lr_source: str


@dataclass(frozen=True)
class Checkpoint:
    """The trained model: the final sampler checkpoint of the last training loop."""

    sampler_path: str  # tinker://<run id>/...

    @property
    def tinker_run_id(self) -> str:
        return self.sampler_path.removeprefix("tinker://").split("/", 1)[0]


@dataclass
class RunState:
    """What is known so far; written to summary.json even when the run stops part-way."""

    cfg: RunSettings  # the method's own config (e.g. SFTConfig)
    run_name: str
    backend: str
    method: str  # the training method (task=)
    store: results.ResultsDir
    length: Length | None = None  # how num_epochs and batch_size were chosen
    guard: GuardSet | None = None  # the guard set both models are also scored on (guard=false: None)
    # What the phases produced, in their order (each set once, by the phase that produced it).
    durations: dict[str, float] = field(default_factory=dict)
    chosen: Chosen | None = None
    budget: plan.TokenBudget | None = None
    baseline: float | None = None
    stages: list[TrainingStage] = field(default_factory=list)
    checkpoint: Checkpoint | None = None
    trained: float | None = None

    @property
    def log_path(self) -> Path:
        return self.store.log_dir(self.run_name)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            self.durations[name] = round(time.monotonic() - start, 2)
