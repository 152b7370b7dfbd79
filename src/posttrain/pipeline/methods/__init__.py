"""The training methods, by the name `task=` uses. A new method is one module here and one line in METHODS
(and its name in config.TaskName)."""

from __future__ import annotations

from posttrain.pipeline.methods.base import Method, MethodFactory, RunContext
from posttrain.pipeline.methods.distillation import Distillation
from posttrain.pipeline.methods.dpo import DPO
from posttrain.pipeline.methods.prompt_distillation import PromptDistillation
from posttrain.pipeline.methods.rl import RL
from posttrain.pipeline.methods.sft import SFT

METHODS: dict[str, MethodFactory] = {
    "sft": SFT,
    "rl": RL,
    "dpo": DPO,
    "distillation": Distillation,
    "prompt_distillation": PromptDistillation,
}

__all__ = ["METHODS", "Method", "MethodFactory", "RunContext"]
