"""The training methods, by the name `task=` uses: one line each. A new method is one module (the method, and its
settings beside the cookbook Config it drives) and one line here.

A line says where the method and its config class are, which data formats `task=auto` picks it for, which of
its own settings make `task=auto` pick it, and how its default learning rate is chosen. Modules are imported
when their method is used: several load the cookbook's loops and torch (seconds), and the checks before a run
must answer fast.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from posttrain.pipeline.data.formats import CHAT_FORMATS
from posttrain.pipeline.methods.base import (
    Method,
    MethodFactory,
    RunContext,
    TrainingStage,
    training_stages,
)


@dataclass(frozen=True)
class LearningRate:
    """The default learning rate: the cookbook's `get_lr` for the model times `factor`; `fallback` for models
    outside the cookbook's calibrated families."""

    factor: float = 1.0
    fallback: float = 2e-4
    why: str = ""  # what the factor is, for summary.json's learning_rate_source


SUPERVISED_LR = LearningRate(1.0, 5e-4)
RL_LR = LearningRate(0.5, 2e-4, "/ 2 for RL")  # RL: half the supervised rate


@dataclass(frozen=True)
class Registered:
    path: str  # "module:Factory" (a class, or a function returning the method)
    config: str  # "module:Class": every setting the method takes
    formats: frozenset[str] = frozenset()  # data formats task=auto picks it for
    chosen_by: tuple[str, ...] = ()  # its settings that, given, make task=auto pick it
    learning_rate: LearningRate = LearningRate()


_M = "posttrain.pipeline.methods"
# task=auto tries these in order: the first whose chosen_by settings are given, else the first taking the data.
METHODS: dict[str, Registered] = {
    "distillation": Registered(f"{_M}.distillation.method:Distillation", f"{_M}.distillation.settings:DistillationConfig",
                               chosen_by=("teacher_model", "distillation_mode")),
    "prompt_distillation": Registered(f"{_M}.prompt_distillation:PromptDistillation",
                                      f"{_M}.prompt_distillation:PromptDistillationConfig", chosen_by=("system_prompt",)),
    "rubric": Registered(f"{_M}.rubric:rubric", f"{_M}.rubric:RubricConfig", frozenset({"rubric"}),
                         ("grader_model", "grader_mode"), RL_LR),
    "rl": Registered(f"{_M}.rl:RL", f"{_M}.rl:RLConfig", frozenset({"question_answer", "code", "secret"}), ("env",), RL_LR),
    "sft": Registered(f"{_M}.sft:SFT", f"{_M}.sft:SFTConfig", CHAT_FORMATS, learning_rate=SUPERVISED_LR),
    "dpo": Registered(f"{_M}.dpo:DPO", f"{_M}.dpo:DPOConfig", frozenset({"preference"})),
    "rlhf": Registered(f"{_M}.rlhf:RLHF", f"{_M}.rlhf:RLHFConfig", learning_rate=SUPERVISED_LR),
    "pairwise_rl": Registered(f"{_M}.pairwise_rl:PairwiseRL", f"{_M}.pairwise_rl:PairwiseRLConfig",
                              chosen_by=("preference_model",), learning_rate=RL_LR),
}  # fmt: skip


def _load(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def method_class(name: str) -> MethodFactory:
    return _load(METHODS[name].path)


def config_class(name: str) -> type:
    return _load(METHODS[name].config)


__all__ = [
    "METHODS",
    "LearningRate",
    "Method",
    "MethodFactory",
    "Registered",
    "RunContext",
    "TrainingStage",
    "config_class",
    "method_class",
    "training_stages",
]
