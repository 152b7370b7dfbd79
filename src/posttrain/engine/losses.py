"""The Tinker built-in losses, token-level and summed (no mean, no normalisation), as the Tinker docs define them.

`lp` is the learner's log-probability of `target_tokens`; `q` the sampler's (`loss_fn_inputs["logprobs"]`);
`A` the advantages. Each function returns the per-token loss, the same shape as `lp`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from posttrain.engine.wire import WireError

LossInputs = dict[str, torch.Tensor]
LossFn = Callable[[torch.Tensor, LossInputs, dict[str, float | str]], torch.Tensor]

REQUIRED_INPUTS: dict[str, tuple[str, ...]] = {
    "cross_entropy": ("target_tokens",),
    "importance_sampling": ("target_tokens", "logprobs", "advantages"),
    "ppo": ("target_tokens", "logprobs", "advantages"),
    "cispo": ("target_tokens", "logprobs", "advantages"),
    "dro": ("target_tokens", "logprobs", "advantages"),
}


def _number(config: dict[str, float | str], key: str, default: float) -> float:
    value = config.get(key, default)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise WireError(f"loss_fn_config[{key!r}] must be a number, got {value!r}") from None


def cross_entropy(lp: torch.Tensor, inputs: LossInputs, config: dict[str, float | str]) -> torch.Tensor:
    weights = inputs.get("weights")
    # Missing weights mean "every target token counts", as the docs' examples send.
    return -lp if weights is None else -lp * weights


def importance_sampling(lp: torch.Tensor, inputs: LossInputs, config: dict[str, float | str]) -> torch.Tensor:
    return -torch.exp(lp - inputs["logprobs"]) * inputs["advantages"]


def ppo(lp: torch.Tensor, inputs: LossInputs, config: dict[str, float | str]) -> torch.Tensor:
    low = _number(config, "clip_low_threshold", 0.8)
    high = _number(config, "clip_high_threshold", 1.2)
    ratio = torch.exp(lp - inputs["logprobs"])
    advantages = inputs["advantages"]
    return -torch.minimum(ratio * advantages, ratio.clamp(low, high) * advantages)


def cispo(lp: torch.Tensor, inputs: LossInputs, config: dict[str, float | str]) -> torch.Tensor:
    low = _number(config, "clip_low_threshold", 0.0)
    high = _number(config, "clip_high_threshold", 4.0)
    ratio = torch.exp(lp - inputs["logprobs"]).clamp(low, high).detach()
    return -ratio * lp * inputs["advantages"]


def dro(lp: torch.Tensor, inputs: LossInputs, config: dict[str, float | str]) -> torch.Tensor:
    beta = _number(config, "beta", 0.05)
    return -(lp * inputs["advantages"] - 0.5 * beta * (lp - inputs["logprobs"]) ** 2)


LOSSES: dict[str, LossFn] = {
    "cross_entropy": cross_entropy,
    "importance_sampling": importance_sampling,
    "ppo": ppo,
    "cispo": cispo,
    "dro": dro,
}


def get_loss(name: str) -> LossFn:
    if name not in LOSSES:
        raise WireError(
            f"loss_fn {name!r} is not supported by the local engine; available: {', '.join(LOSSES)}"
        )
    return LOSSES[name]


def check_inputs(loss_fn: str, index: int, n_tokens: int, inputs: LossInputs) -> None:
    for key in REQUIRED_INPUTS[loss_fn]:
        if key not in inputs:
            raise WireError(
                f"datum {index}: loss_fn {loss_fn!r} needs loss_fn_inputs[{key!r}], which is missing"
            )
    target = inputs["target_tokens"]
    if target.dim() not in (1, 2) or target.shape[0] != n_tokens:
        raise WireError(
            f"datum {index}: target_tokens has shape {list(target.shape)}; expected [{n_tokens}] or "
            f"[{n_tokens}, K] for a model_input of {n_tokens} tokens"
        )
    for key, tensor in inputs.items():
        if key in REQUIRED_INPUTS["ppo"] + ("weights",) and tensor.shape != target.shape:
            raise WireError(
                f"datum {index}: loss_fn_inputs[{key!r}] has shape {list(tensor.shape)}, "
                f"expected {list(target.shape)} like target_tokens"
            )
