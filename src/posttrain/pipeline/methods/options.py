"""The setting groups several methods share (held-out sampling, rollouts, the RL loop, verifiers), each beside
the check of its values. A method's config is its own groups plus these (`RLConfig`, `DPOConfig`, ...); an
environment's settings are the environment's (`envs.settings`)."""

from __future__ import annotations

from typing import Any, Literal

import chz

from posttrain.config.checks import at_least, between, not_blank, whole_number
from posttrain.errors import ConfigError

# The RL losses both Tinker and the local engine implement that the RL loop takes (tinker.types.LossFnType,
# less `custom`, which is client-side).
RLLossFn = Literal["importance_sampling", "ppo", "cispo", "dro", "gspo", "stable_reinforce"]


@chz.chz
class EvalSamplingOptions:
    """How held-out answers are sampled (the same for the base and the trained model)."""

    max_tokens: int = chz.field(default=256, doc="max sampled tokens per completion")
    eval_temperature: float = chz.field(default=0.0, doc="sampling temperature for evaluation (0: greedy)")

    @staticmethod
    def check(cfg: Any) -> None:
        at_least("max_tokens", cfg.max_tokens, 1)
        between("eval_temperature", cfg.eval_temperature, 0, 2)


@chz.chz
class TemperatureOptions:
    temperature: float = chz.field(
        default=1.0, doc="sampling temperature of training rollouts (and of teachers)"
    )

    @staticmethod
    def check(cfg: Any) -> None:
        if not (isinstance(cfg.temperature, int | float) and 0 < cfg.temperature <= 2):
            raise ConfigError(f"temperature={cfg.temperature!r} is not valid; expected a number in (0, 2]")


@chz.chz
class RolloutOptions:
    """What the cookbook's `rl.train.Config` takes besides the run's settings."""

    group_size: int = chz.field(default=8, doc="RL rollouts per problem")
    loss_fn: RLLossFn = chz.field(
        default="importance_sampling", doc="importance_sampling|ppo|cispo|dro|gspo|stable_reinforce"
    )
    kl_penalty_coef: float | None = chz.field(
        default=None,
        doc="KL penalty against the reference policy (None: the loop's own default, 0 for RL, 1 for on-policy "
        "distillation, whose reward is that KL)",
    )
    kl_discount_factor: float = chz.field(default=0.0, doc="discount of the KL penalty over later tokens")
    num_substeps: int = chz.field(default=1, doc="optimizer steps per batch of rollouts")

    @staticmethod
    def check(cfg: Any) -> None:
        whole_number("group_size", cfg.group_size, 2, " (RL advantages compare rollouts within a group)")
        if cfg.kl_penalty_coef is not None:
            at_least("kl_penalty_coef", cfg.kl_penalty_coef, 0)
        between("kl_discount_factor", cfg.kl_discount_factor, 0, 1)
        at_least("num_substeps", cfg.num_substeps, 1)
        if cfg.batch_size % cfg.num_substeps:
            raise ConfigError(f"num_substeps={cfg.num_substeps} must divide batch_size={cfg.batch_size}")


@chz.chz
class RLLoopOptions:
    """What only the cookbook's `rl.train.Config` takes (RL, rubrics, RLHF's RL stage; not on-policy distillation)."""

    remove_constant_reward_groups: bool = chz.field(
        default=False, doc="drop groups whose rollouts all got the same reward (no advantage to learn from)"
    )
    max_steps_off_policy: int | None = chz.field(
        default=None,
        doc="asynchronous RL (the cookbook's AsyncConfig): sample with weights up to this many steps old "
        "(None: synchronous)",
    )
    num_minibatches: int | None = chz.field(
        default=None,
        doc="stream each batch to training in this many minibatches as its rollouts finish (the cookbook's "
        "StreamMinibatchConfig; None: whole batches)",
    )

    @staticmethod
    def check(cfg: Any) -> None:
        if cfg.max_steps_off_policy is not None:
            at_least("max_steps_off_policy", cfg.max_steps_off_policy, 0)
        if cfg.num_minibatches is not None:
            at_least("num_minibatches", cfg.num_minibatches, 1)
            if cfg.batch_size % cfg.num_minibatches:
                raise ConfigError(
                    f"num_minibatches={cfg.num_minibatches} must divide batch_size={cfg.batch_size}"
                )
        if cfg.max_steps_off_policy is not None and cfg.num_minibatches is not None:
            raise ConfigError("max_steps_off_policy and num_minibatches do not go together; choose one")


@chz.chz
class RewardOptions:
    reward_fn: str | None = chz.field(
        default=None,
        doc="RL: your own verifier, path/to/file.py:function (gets the problem row and the completion, "
        "returns a float)",
    )

    @staticmethod
    def check(cfg: Any) -> None:
        not_blank(cfg, "reward_fn")


@chz.chz
class VerifierOptions:
    verifier_timeout: float = chz.field(
        default=10.0, doc="seconds one call of your function may take; a slower call is stopped and scores 0"
    )

    @staticmethod
    def check(cfg: Any) -> None:
        timeout = cfg.verifier_timeout
        if isinstance(timeout, bool) or not (isinstance(timeout, int | float) and 0 < timeout <= 3600):
            raise ConfigError(f"verifier_timeout={timeout!r} is not valid; expected seconds in (0, 3600]")


def rollout_settings(cfg: Any, reference: str | None = None) -> dict[str, Any]:
    """The sampling, loss and loop settings of an `rl.train` Config (RL, rubrics, RLHF's last stage). A KL
    penalty is taken against the base model, or against `reference` (a sampler checkpoint of it)."""
    from tinker_cookbook.rl.train import AsyncConfig, KLReferenceConfig, StreamMinibatchConfig

    kl = cfg.kl_penalty_coef or 0.0
    settings = dict(
        max_tokens=cfg.max_tokens,
        temperature=cfg.temperature,
        loss_fn=cfg.loss_fn,
        max_steps=cfg.max_steps,
        kl_penalty_coef=kl,
        kl_discount_factor=cfg.kl_discount_factor,
        num_substeps=cfg.num_substeps,
        remove_constant_reward_groups=cfg.remove_constant_reward_groups,
    )
    if kl > 0:
        settings["kl_reference_config"] = KLReferenceConfig(
            base_model=cfg.model_name, load_checkpoint_path=reference
        )
    if cfg.max_steps_off_policy is not None:
        settings["async_config"] = AsyncConfig(
            max_steps_off_policy=cfg.max_steps_off_policy,
            groups_per_batch=cfg.batch_size,
            loss_fn=cfg.loss_fn,
        )
    if cfg.num_minibatches is not None:
        settings["stream_minibatch_config"] = StreamMinibatchConfig(
            groups_per_batch=cfg.batch_size, num_minibatches=cfg.num_minibatches
        )
    return settings
