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
# DPO: a tenth of the supervised rate (the cookbook's "~1e-5" for large models), after an SFT stage on the chosen
# answers at the supervised rate. Measured on the gallery's 640 pairs without the SFT stage (docs/preference.md):
# 3e-4 -> preference accuracy +15.6 points but the model's own answers 61% -> 31% right; 1e-4 -> +6.2, 59% -> 36%;
# 5e-5 -> +7.8 (inconclusive), no regression.
DPO_LR = LearningRate(0.1, 5e-5, "/ 10 for DPO")


@dataclass(frozen=True)
class Steps:
    """The optimizer steps a method needs to move its metric, from the gallery's and docs/' measured runs with the
    default model (a few hundred rows). With neither num_epochs nor max_steps given, a run on a dataset takes enough
    passes to reach it (`methods/length.py`); a run with fewer steps is warned about in its plan and before training."""

    minimum: int
    measured: str  # the runs the minimum comes from (summary.json's num_epochs_source, the warning)
    # Whether batch_size (not given) may shrink for a small dataset; RL's stays: num_substeps and num_minibatches
    # must divide it, and its steps come from generated problems sized by it.
    shrink_batch: bool = True


# Measured with SmolLM2-135M-Instruct on the local engine (README: gallery; docs/: measured-runs, distillation).
SFT_STEPS = Steps(10, "the default SFT run: 11 steps of 32 -> held-out NLL -44%")
DPO_STEPS = Steps(
    24,
    "gallery dpo: after its SFT stage, 36 steps of 32 -> +14.1 points (improved), task accuracy +25 points; "
    "one pass of 216 pairs in steps of 32 (no SFT stage) left it unchanged",
)
DISTILLATION_STEPS = Steps(
    16, "off-policy: 11 steps of 32 -> NLL -29%, 16 steps -> -85%; on-policy: 12 steps of 16 -> -37.5%"
)
PROMPT_DISTILLATION_STEPS = Steps(32, "10 steps -> NLL -6%; 33 and 44 steps -> -24% and -29%")
RL_STEPS = Steps(
    16, "gallery math_rl and game_rl: 16 steps of 8 problems -> +60 and +52 points", shrink_batch=False
)
PAIRWISE_RL_STEPS = Steps(12, "12 steps of 4 prompts -> win rate 50% -> 95%", shrink_batch=False)


@dataclass(frozen=True)
class Registered:
    path: str  # "module:Factory" (a class, or a function returning the method)
    config: str  # "module:Class": every setting the method takes
    formats: frozenset[str] = frozenset()  # data formats task=auto picks it for
    chosen_by: tuple[str, ...] = ()  # its settings that, given, make task=auto pick it
    learning_rate: LearningRate = LearningRate()
    steps: Steps | None = None  # None: no measured minimum (no scaling, no warning)


_M = "posttrain.pipeline.methods"
# task=auto tries these in order: the first whose chosen_by settings are given, else the first taking the data.
METHODS: dict[str, Registered] = {
    "distillation": Registered(
        f"{_M}.distillation.method:Distillation",
        f"{_M}.distillation.settings:DistillationConfig",
        chosen_by=("teacher_model", "distillation_mode"),
        steps=DISTILLATION_STEPS,
    ),
    "prompt_distillation": Registered(
        f"{_M}.prompt_distillation:PromptDistillation",
        f"{_M}.prompt_distillation:PromptDistillationConfig",
        chosen_by=("system_prompt",),
        steps=PROMPT_DISTILLATION_STEPS,
    ),
    "rubric": Registered(
        f"{_M}.rubric:rubric",
        f"{_M}.rubric:RubricConfig",
        frozenset({"rubric"}),
        ("grader_model", "grader_mode"),
        RL_LR,
        RL_STEPS,
    ),
    "rl": Registered(
        f"{_M}.rl:RL",
        f"{_M}.rl:RLConfig",
        frozenset({"question_answer", "code", "secret"}),
        ("env",),
        RL_LR,
        RL_STEPS,
    ),
    # Image classification rows train a vision-language model (supervised.py picks image_sft.ImageSFT).
    "sft": Registered(
        f"{_M}.supervised:supervised",
        f"{_M}.sft:SFTConfig",
        CHAT_FORMATS | {"image"},
        learning_rate=SUPERVISED_LR,
        steps=SFT_STEPS,
    ),
    "dpo": Registered(
        f"{_M}.dpo:DPO",
        f"{_M}.dpo:DPOConfig",
        frozenset({"preference"}),
        learning_rate=DPO_LR,
        steps=DPO_STEPS,
    ),
    # RLHF: no minimum measured (6 steps per stage left its reward model at chance; docs/preference.md, RLHF).
    "rlhf": Registered(f"{_M}.rlhf:RLHF", f"{_M}.rlhf:RLHFConfig", learning_rate=SUPERVISED_LR),
    "pairwise_rl": Registered(
        f"{_M}.pairwise_rl:PairwiseRL",
        f"{_M}.pairwise_rl:PairwiseRLConfig",
        chosen_by=("preference_model",),
        learning_rate=RL_LR,
        steps=PAIRWISE_RL_STEPS,
    ),
}


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
    "Steps",
    "RunContext",
    "TrainingStage",
    "config_class",
    "method_class",
    "training_stages",
]
