"""The Tinker built-in losses, token-level and summed (no mean, no normalisation), as the Tinker docs define them.

`lp` is the learner's log-probability of `target_tokens`; `q` the sampler's (`loss_fn_inputs["logprobs"]`);
`A` the advantages. Each function returns the per-token loss, the same shape as `lp`.

Two losses weigh each token by a statistic of its whole datum (a sequence-level ratio). The runtime computes it
first (`SEQUENCE_STATISTICS`, from the datum's detached log-probs) and passes it in as the per-token constant
`sequence_log_ratio`, so every loss stays elementwise in `lp` and the unembedding can still be chunked:
- `gspo` (GSPO-token, as the Tinker docs give it): s = exp(mean over the masked tokens of lp - q); each token's
  ratio has s's value and its own lp's gradient, clipped like PPO's.
- `stable_reinforce`: Tinker documents its inputs (sampling-time records named by provenance spans) but not its
  objective. Ours is tapered off-policy REINFORCE (TOPR, Le Roux et al. 2025) at the sequence level, with the
  sampler's recorded log-probabilities: tokens of a trajectory with A >= 0 get the plain REINFORCE term
  -lp * A, those with A < 0 get it weighted by the truncated sequence ratio min(1, prod p/q). On-policy both
  weights are 1: its gradient is then importance_sampling's. Numbers on Tinker will differ.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from posttrain.engine.errors import WireError

LossInputs = dict[str, torch.Tensor]
LossFn = Callable[[torch.Tensor, LossInputs, dict[str, float | str]], torch.Tensor]

REQUIRED_INPUTS: dict[str, tuple[str, ...]] = {
    "cross_entropy": ("target_tokens",),
    "importance_sampling": ("target_tokens", "logprobs", "advantages"),
    "ppo": ("target_tokens", "logprobs", "advantages"),
    "cispo": ("target_tokens", "logprobs", "advantages"),
    "dro": ("target_tokens", "logprobs", "advantages"),
    "gspo": ("target_tokens", "logprobs", "advantages"),
    # The sampling-time log-probabilities come from the engine's records (engine/stability.py).
    "stable_reinforce": ("target_tokens", "advantages"),
}
# Per-token inputs a datum may carry besides the required ones; each must have target_tokens' shape.
OPTIONAL_INPUTS = ("weights", "logprobs", "sequence_ratio_mask", "clip_low_threshold", "clip_high_threshold")
# Losses whose datums must say where their tokens were sampled (Datum.loss_fn_input_spans).
NEEDS_PROVENANCE = frozenset({"stable_reinforce"})


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


def _threshold(
    inputs: LossInputs, config: dict[str, float | str], key: str, default: float
) -> torch.Tensor | float:
    # A per-token threshold (a loss_fn_inputs tensor, as the SDK allows) wins over loss_fn_config's number.
    return inputs[key] if key in inputs else _number(config, key, default)


def gspo(lp: torch.Tensor, inputs: LossInputs, config: dict[str, float | str]) -> torch.Tensor:
    ratio = torch.exp(inputs["sequence_log_ratio"] + lp - lp.detach())
    low = _threshold(inputs, config, "clip_low_threshold", 0.8)
    high = _threshold(inputs, config, "clip_high_threshold", 1.2)
    advantages = inputs["advantages"]
    return -torch.minimum(ratio * advantages, torch.clamp(ratio, low, high) * advantages)


def stable_reinforce(lp: torch.Tensor, inputs: LossInputs, config: dict[str, float | str]) -> torch.Tensor:
    advantages = inputs["advantages"]
    taper = torch.exp(inputs["sequence_log_ratio"]).clamp(max=1.0)
    weight = torch.where(advantages >= 0, torch.ones_like(taper), taper)
    return -weight * lp * advantages * inputs["sampled"]


def _gspo_log_ratio(lp: torch.Tensor, inputs: LossInputs) -> torch.Tensor:
    """The mean log-ratio over `sequence_ratio_mask` (absent: the sampled tokens where the provenance says, else
    every token with an advantage); 0 when the mask is empty."""
    if "sequence_ratio_mask" in inputs:
        mask = inputs["sequence_ratio_mask"] != 0
    elif "sampled" in inputs:
        mask = inputs["sampled"] != 0
    else:
        mask = inputs["advantages"] != 0
    log_ratio = (lp - inputs["logprobs"])[mask]
    return torch.full_like(lp, float(log_ratio.mean()) if log_ratio.numel() else 0.0)


def _trajectory_log_ratio(lp: torch.Tensor, inputs: LossInputs) -> torch.Tensor:
    """log prod p/q over the datum's sampled tokens, q the sampler's recorded log-probabilities."""
    return torch.full_like(lp, float(((lp - inputs["sampler_logprobs"]) * inputs["sampled"]).sum()))


# Per-token constants a loss needs from its whole datum, computed from the datum's detached log-probs.
SEQUENCE_STATISTICS: dict[str, Callable[[torch.Tensor, LossInputs], torch.Tensor]] = {
    "gspo": _gspo_log_ratio,
    "stable_reinforce": _trajectory_log_ratio,
}


LOSSES: dict[str, LossFn] = {
    "cross_entropy": cross_entropy,
    "importance_sampling": importance_sampling,
    "ppo": ppo,
    "cispo": cispo,
    "dro": dro,
    "gspo": gspo,
    "stable_reinforce": stable_reinforce,
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
    if loss_fn in SEQUENCE_STATISTICS and target.dim() != 1:
        raise WireError(
            f"datum {index}: loss_fn {loss_fn!r} takes one target per position (1-D target_tokens)"
        )
    for key, tensor in inputs.items():
        if key in ("advantages", *OPTIONAL_INPUTS) and tensor.shape != target.shape:
            raise WireError(
                f"datum {index}: loss_fn_inputs[{key!r}] has shape {list(tensor.shape)}, "
                f"expected {list(target.shape)} like target_tokens"
            )
