"""The interface every training method implements, and what each one is given.

A method turns the run's settings and data into: the files it trains on, one evaluation that is run the same
way on the base and the trained model, and a cookbook training loop. `run.py` drives every method through the
same steps (prepare, evaluate base, train, evaluate trained), so preflight, results, the report and W&B
verification are the same for all of them.

Training is one cookbook loop for most methods. A method made of several loops run one after the other
(task=rlhf: policy SFT, reward model, RL) also defines `stages()`: each stage is a phase on the terminal with
its own progress bar and its own log folder; the last stage's final checkpoint is the trained model.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar

from posttrain.config.run import RunSettings
from posttrain.errors import UserError
from posttrain.pipeline.data import LoadedData
from posttrain.pipeline.results import MetricKind

if TYPE_CHECKING:
    import tinker
    from tinker_cookbook import renderers

    from posttrain.pipeline.setup.plan import TokenBudget


C = TypeVar("C", bound=RunSettings)


@dataclass(frozen=True)
class RunContext(Generic[C]):
    """What a method is given: its settings (its own config class, e.g. `SFTConfig`), where its files go, the
    service, and the choices made for it."""

    cfg: C
    run_name: str
    log_path: Path
    service: tinker.ServiceClient | None  # None in a Tinker plan, which asks nothing of the service
    base_url: str | None
    renderer_name: str
    renderer: renderers.Renderer
    learning_rate: float
    wandb_project: str
    say: Callable[[str], None]

    @property
    def data_dir(self) -> Path:
        """Where the data as trained on is kept (inside the log directory, so a run can be reproduced)."""
        return self.log_path / "data"

    def loop_settings(self) -> dict[str, Any]:
        """The settings every cookbook training Config shares (supervised, RL, DPO, distillation)."""
        cfg = self.cfg
        return dict(
            log_path=str(self.log_path),
            model_name=cfg.model_name,
            renderer_name=self.renderer_name,
            learning_rate=self.learning_rate,
            lora_rank=cfg.lora_rank,
            base_url=self.base_url,
            save_every=cfg.save_every,
            eval_every=cfg.eval_every,
            wandb_project=self.wandb_project,
            wandb_name=cfg.wandb_name or self.run_name,
            load_checkpoint_path=cfg.load_checkpoint_path,
        )


class Method(Protocol):
    """One training method.

    Constructed with (cfg, data) before anything is spent: the constructor checks that the data and settings
    fit the method (raising a one-line `UserError`) and builds what needs no service (e.g. generated problems).
    Then `prepare(ctx)` once the service is up, and evaluate / train / describe.
    """

    name: str
    # How the evaluation scores: "nll" (lower is better) or "score" (an accuracy, higher is better).
    metric: ClassVar[MetricKind]
    # What the aggregate "score" is called in the report ("accuracy", "preference accuracy"; "NLL" for nll).
    score_label: str
    # Models the backend must serve besides the one trained (a distillation teacher).
    extra_models: Sequence[str]

    def prepare(self, ctx: RunContext) -> None:
        """Keep `ctx`; write the data as trained on under ctx.data_dir and build the held-out set; say what was
        chosen."""
        ...

    # Optimizer steps the training loop will take (known after prepare), for the progress bar.
    total_steps: int

    async def evaluate(self, client: tinker.SamplingClient, label: str) -> tuple[list[Any], float]:
        """Per-example rows and the aggregate score of `client` on the held-out set."""
        ...

    def train(self) -> Coroutine[Any, Any, Any]:
        """The cookbook training loop, configured (awaiting it trains and writes checkpoints to log_path)."""
        ...

    def token_budget(self) -> TokenBudget:
        """The tokens the run will train on, prefill and sample (after prepare), for the plan and the bill."""
        ...

    def score_text(self, value: float) -> str:
        """The aggregate score in words, e.g. 'held-out NLL 2.4100'."""
        ...

    def describe(self) -> tuple[Mapping[str, Any], Mapping[str, int], Mapping[str, Any]]:
        """(dataset facts, sizes, extra summary fields) for summary.json."""
        ...

    # Optional: a method made of several loops defines it; by default a method is its one loop, `train`.
    def stages(self) -> list[TrainingStage] | None:
        """The training loops, in order, each a phase with its own log folder (None: the one loop `train`)."""
        return None


@dataclass(frozen=True)
class TrainingStage:
    """One cookbook training loop of a method."""

    name: str  # the phase on the terminal, the log sub-folder and the durations key ("training" for one loop)
    log_path: Path  # the loop's metrics.jsonl, checkpoints.jsonl and W&B files
    total_steps: int
    # Configures and returns the loop when the stage begins: a later stage needs the earlier ones' checkpoints.
    start: Callable[[], Coroutine[Any, Any, Any]]
    wandb_name: str
    # Run once the loop has finished and its progress bar closed (e.g. measuring the stage's model).
    after: Callable[[], Coroutine[Any, Any, Any]] | None = None


def stage_checkpoint(log_path: Path, key: str, stage: str) -> str:
    """The `key` (state_path or sampler_path) of the last checkpoint a finished stage (`stage`, in words) saved."""
    from tinker_cookbook import checkpoint_utils

    record = checkpoint_utils.get_last_checkpoint(str(log_path), required_key=key)
    path = getattr(record, key, None) if record is not None else None
    if not path:
        raise UserError(f"{stage} left no checkpoint in {log_path}/checkpoints.jsonl")
    return path


def training_stages(method: Method, ctx: RunContext) -> list[TrainingStage]:
    """The method's `stages()` when it has several loops, else its one loop (`train`) in the run's log folder."""
    stages = method.stages()
    if stages is not None:
        return list(stages)
    return [TrainingStage("training", ctx.log_path, method.total_steps, method.train, ctx.run_name)]


MethodFactory = Callable[[Any, LoadedData | None], Method]
