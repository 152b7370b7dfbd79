"""What a run knows so far: written to summary.json even when the run stops part-way."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.pipeline import results
from posttrain.pipeline.evaluation.guard import GuardSet
from posttrain.pipeline.methods import TrainingStage
from posttrain.pipeline.methods.length import Length
from posttrain.pipeline.setup import plan


@dataclass
class RunState:
    """What is known so far; written to summary.json even when the run stops part-way."""

    cfg: Any  # the method's own config (e.g. SFTConfig)
    run_name: str
    backend: str
    method: str  # the training method (task=)
    store: results.ResultsDir
    durations: dict[str, float] = field(default_factory=dict)
    tinker_run_id: str | None = None
    sampler_path: str | None = None
    baseline: float | None = None
    trained: float | None = None
    renderer_name: str = ""
    renderer_source: str = ""
    learning_rate: float | None = None
    lr_source: str = ""
    budget: plan.TokenBudget | None = None
    stages: list[TrainingStage] = field(default_factory=list)
    length: Length | None = None  # how num_epochs and batch_size were chosen
    guard: GuardSet | None = None  # the guard set both models are also scored on (guard=false: None)

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
