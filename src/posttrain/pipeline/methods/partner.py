"""The model that plays an environment's other side (twenty questions' answerer, `partner_model=`): served by
name beside the policy, greedy, never trained; the base model itself unless another is named."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from posttrain.pipeline.envs import registry

if TYPE_CHECKING:
    from posttrain.pipeline.envs.spec import EnvSpec
    from posttrain.pipeline.methods.base import RunContext


@dataclass
class Partner:
    model: str
    policy_model: str
    renderer: str | None = None  # chosen once the run's renderer is known (`settings`)

    @staticmethod
    def of(cfg: Any, spec: EnvSpec) -> Partner | None:
        """The partner of a run in `spec`'s environment, if it has one."""
        if not registry.takes_partner(spec):
            return None
        return Partner(getattr(cfg, "partner_model", None) or cfg.model_name, cfg.model_name)

    @property
    def extra_models(self) -> tuple[str, ...]:
        """What the backend must serve besides the policy."""
        return () if self.model == self.policy_model else (self.model,)

    def settings(self, ctx: RunContext) -> dict[str, Any]:
        """The episodes' partner fields: its model and renderer."""
        from posttrain.config.renderers import answering_renderer

        policy = (self.policy_model, ctx.renderer_name)
        self.renderer, source = answering_renderer(self.model, policy, "it answers in a few tokens")
        same = " (the base model itself, never trained)" if self.model == self.policy_model else ""
        ctx.say(f"partner: {self.model}{same}, greedy, renderer {self.renderer} ({source})")
        return {"partner_model": self.model, "partner_renderer_name": self.renderer}

    def summary(self) -> dict[str, Any]:
        return {"partner_model": self.model, "partner_renderer": self.renderer}
