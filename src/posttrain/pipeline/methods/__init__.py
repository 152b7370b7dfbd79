"""The training methods, by the name `task=` uses. A new method is one module here, one line in METHODS (and
its name in config.TaskName).

Modules are imported when their method is used: several load the cookbook's loops and torch (seconds), and the
checks before a run must answer fast.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from posttrain.pipeline.data.formats import CHAT_FORMATS
from posttrain.pipeline.methods.base import (
    Method,
    MethodFactory,
    RunContext,
    TrainingStage,
    training_stages,
)


@dataclass(frozen=True)
class Registered:
    path: str  # "module:Class"
    # Data formats task=auto picks this method for (none: chosen by its own settings, e.g. teacher_model).
    formats: frozenset[str] = frozenset()


METHODS: dict[str, Registered] = {
    "sft": Registered("posttrain.pipeline.methods.sft:SFT", CHAT_FORMATS),
    "rl": Registered("posttrain.pipeline.methods.rl:RL", frozenset({"question_answer", "code"})),
    "dpo": Registered("posttrain.pipeline.methods.dpo:DPO", frozenset({"preference"})),
    "distillation": Registered("posttrain.pipeline.methods.distillation:Distillation"),
    "prompt_distillation": Registered("posttrain.pipeline.methods.prompt_distillation:PromptDistillation"),
    "rlhf": Registered("posttrain.pipeline.methods.rlhf:RLHF"),
    "rubric": Registered("posttrain.pipeline.methods.rubric:RubricRL", frozenset({"rubric"})),
}


def method_class(name: str) -> MethodFactory:
    module, _, cls = METHODS[name].path.partition(":")
    return getattr(importlib.import_module(module), cls)


__all__ = [
    "METHODS",
    "Method",
    "MethodFactory",
    "Registered",
    "RunContext",
    "TrainingStage",
    "method_class",
    "training_stages",
]
