import json

import chz
import pytest

from posttrain.config.parse import (
    UNSUPPORTED_SENTENCE,
    HelpRequested,
    UnsupportedConfigError,
    unsupported_category,
)
from posttrain.errors import ConfigError, UserError
from posttrain.pipeline.settings import TrainConfig, config_to_dict, parse_train_args, validate


def supported_parameters() -> list[str]:
    return sorted(chz.chz_fields(TrainConfig))


EXPECTED_FIELDS = {
    "task",
    "dataset",
    "dataset_config",
    "dataset_split",
    "eval_dataset",
    "eval_split",
    "model_name",
    "renderer_name",
    "backend",
    "base_url",
    "run_name",
    "results_dir",
    "learning_rate",
    "lr_schedule",
    "num_epochs",
    "max_steps",
    "batch_size",
    "lora_rank",
    "max_length",
    "train_on_what",
    "max_train_rows",
    "max_eval_rows",
    "eval_concurrency",
    "seed",
    "env",
    "group_size",
    "max_tokens",
    "temperature",
    "eval_temperature",
    "loss_fn",
    "kl_penalty_coef",
    "wandb_project",
    "save_every",
    "eval_every",
    "dtype",
    "dry_run",
    "resume",
    "verbose",
    "dpo_beta",
    "dpo_sft_steps",  # task=dpo: supervised steps on the chosen answers before DPO (None: one pass)
    "teacher_model",
    "distillation_mode",
    "system_prompt",
    "behaviour_check",
    "reward_fn",
    "verifier_timeout",
    "game_opponent",
    "grader_model",
    "grader_mode",
    # the cookbook Configs' own fields the user's document lists (issue 21), and the QA grader
    "adam_beta1",
    "adam_beta2",
    "adam_eps",
    "kl_discount_factor",
    "num_substeps",
    "remove_constant_reward_groups",
    "max_steps_off_policy",
    "num_minibatches",
    "load_checkpoint_path",
    "wandb_name",
    "grader",
    "preference_model",  # task=pairwise_rl
    "partner_model",  # env=game:twenty_questions
    "corpus",
    "retriever",  # env=tools:search over the user's corpus
    "warm_start_steps",  # task=rl: a supervised stage on worked answers before RL (env=tools:search)
    "verifiers_args",  # env=verifiers:NAME
    "guard",
    "guard_dataset",  # the guard evaluation (did training break something else?)
}

SUPPORTED_TAIL = f" Supported parameters: {', '.join(sorted(EXPECTED_FIELDS))}."

NAMED_UNSUPPORTED = [
    "clip_epsilon",
    "ppo_clip",
    "cliprange",
    "epsilon",
    "gae_lambda",
    "lam",
    "dynamic_batch_size",
    "optimizer",
    "optim",
    "grad_clip",
    "max_grad_norm",
    "gradient_clipping",
    "grad_clip_norm",
    "warmup_steps",
    "warmup_ratio",
    "warmup",
    "mixed_precision",
    "fp16",
    "bf16",
    "precision",
    "tensor_parallel",
    "tp_size",
    "pipeline_parallel",
    "model_parallel",
    "fsdp",
    "deepspeed",
]


def test_fields_and_defaults():
    assert set(chz.chz_fields(TrainConfig)) == EXPECTED_FIELDS
    cfg = parse_train_args([])
    assert cfg == TrainConfig()
    assert cfg.model_name == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (cfg.batch_size, cfg.lora_rank, cfg.max_train_rows, cfg.max_eval_rows) == (32, 32, 20_000, 2_000)
    assert cfg.learning_rate is None and cfg.lr_schedule == "linear" and cfg.loss_fn == "importance_sampling"
    validate(cfg)


def test_key_value_parsing_casts_types():
    cfg = parse_train_args(
        [
            "learning_rate=2e-4",
            "max_steps=5",
            "run_name=exp1",
            "--batch_size=4",
            "env=reasoning_gym:leg_counting",
        ]
    )
    assert cfg.learning_rate == pytest.approx(2e-4) and isinstance(cfg.learning_rate, float)
    assert cfg.max_steps == 5 and cfg.batch_size == 4 and cfg.run_name == "exp1"
    assert cfg.env == "reasoning_gym:leg_counting"
    assert parse_train_args(["max_steps=None"]).max_steps is None
    assert parse_train_args(["lr_schedule=cosine"]).lr_schedule == "cosine"


def test_unknown_key_gives_exact_sentence_and_supported_list():
    with pytest.raises(ConfigError) as exc:
        parse_train_args(["batch_size=8", "frobnicate=3"])
    msg = str(exc.value)
    assert msg == f"{UNSUPPORTED_SENTENCE} Unsupported: frobnicate.{SUPPORTED_TAIL}"
    assert "\n" not in msg
    assert msg.startswith(
        "This configuration is not currently available in the Tinker training configs. The available parameters "
        "are listed in the Config classes. Let me know if you'd like to proceed with the supported options."
    )
    assert supported_parameters() == sorted(EXPECTED_FIELDS)


@pytest.mark.parametrize("key", NAMED_UNSUPPORTED)
def test_each_named_unsupported_setting_is_rejected(key):
    with pytest.raises(UnsupportedConfigError) as exc:
        parse_train_args([f"{key}=1"])
    category = unsupported_category(key)
    assert category is not None
    assert str(exc.value) == f"{UNSUPPORTED_SENTENCE} Unsupported: {key} ({category}).{SUPPORTED_TAIL}"
    assert exc.value.keys == [key]


def test_several_unsupported_keys_are_listed_together_and_are_user_errors():
    with pytest.raises(UnsupportedConfigError) as exc:
        parse_train_args(["warmup_steps=100", "learning_rate=1e-4", "max_grad_norm=1.0", "lr_schedule=step"])
    expected = "warmup_steps (learning-rate warmup), max_grad_norm (gradient clipping), lr_schedule=step"
    assert f"Unsupported: {expected}.{SUPPORTED_TAIL}" in str(exc.value)
    assert isinstance(exc.value, UserError) and exc.value.exit_code == 2


def test_lr_schedule_outside_the_cookbook_options_is_unsupported():
    with pytest.raises(UnsupportedConfigError) as exc:
        parse_train_args(["lr_schedule=warmup_cosine"])
    assert str(exc.value) == f"{UNSUPPORTED_SENTENCE} Unsupported: lr_schedule=warmup_cosine.{SUPPORTED_TAIL}"
    with pytest.raises(UnsupportedConfigError):
        validate(TrainConfig(lr_schedule="polynomial"))
    for ok in ("linear", "cosine", "constant"):
        validate(TrainConfig(lr_schedule=ok))


@pytest.mark.parametrize(
    "arg, key, expected",
    [
        ("batch_size=abc", "batch_size", "integer"),
        ("learning_rate=fast", "learning_rate", "number"),
        ("temperature=hot", "temperature", "number"),
        ("max_steps=1.5", "max_steps", "integer"),
    ],
)
def test_malformed_value_names_key_and_type(arg, key, expected):
    with pytest.raises(ConfigError) as exc:
        parse_train_args([arg])
    msg = str(exc.value)
    assert not isinstance(exc.value, UnsupportedConfigError)
    assert key in msg and expected in msg and "\n" not in msg


def test_argument_without_value_is_rejected():
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_train_args(["batch_size"])
    with pytest.raises(ConfigError, match="given twice"):
        parse_train_args(["batch_size=4", "batch_size=8"])


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_raises_help_requested_with_every_field(flag):
    with pytest.raises(HelpRequested) as exc:
        parse_train_args(["batch_size=4", flag])
    assert not isinstance(exc.value, UserError)
    assert exc.value.exit_code == 0
    for name in EXPECTED_FIELDS:
        assert name in exc.value.text


@pytest.mark.parametrize(
    "kwargs, names",
    [
        (
            {"task": "pretrain"},
            ["task", "auto", "sft", "rl", "dpo", "rlhf", "distillation", "prompt_distillation"],
        ),
        ({"backend": "gpu"}, ["backend", "tinker", "local"]),
        ({"loss_fn": "grpo"}, ["loss_fn", "importance_sampling", "ppo", "cispo", "dro"]),
        ({"dtype": "fp16"}, ["dtype", "bf16", "fp32"]),
        ({"train_on_what": "everything"}, ["train_on_what", "last_assistant_message"]),
        ({"env": "chess"}, ["env", "math", "arithmetic", "reasoning_gym:TASK"]),
        ({"env": "reasoning_gym:"}, ["env"]),
    ],
)
def test_validate_enumerations_name_option_and_allowed_values(kwargs, names):
    with pytest.raises(ConfigError) as exc:
        validate(TrainConfig(**kwargs))
    for n in names:
        assert n in str(exc.value)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"num_epochs": 0}, "num_epochs"),
        ({"max_train_rows": 20_001}, "max_train_rows"),
        ({"max_eval_rows": 2_001}, "max_eval_rows"),
        ({"group_size": 1}, "group_size"),
        ({"temperature": 0.0}, "temperature"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"lora_rank": 0}, "lora_rank"),
        ({"run_name": "../escape"}, "run_name"),
        ({"base_url": "localhost:8000"}, "base_url"),
        ({"dataset": ""}, "dataset"),
        ({"kl_penalty_coef": -0.1}, "kl_penalty_coef"),
    ],
)
def test_validate_ranges(kwargs, key):
    with pytest.raises(ConfigError) as exc:
        validate(TrainConfig(**kwargs))
    assert key in str(exc.value)


def test_validate_accepts_reasonable_settings():
    validate(
        TrainConfig(
            task="rl",
            env="math",
            group_size=4,
            learning_rate=4e-5,
            max_train_rows=100,
            max_eval_rows=10,
            base_url="http://127.0.0.1:8000",
            run_name="math_rl_run_001",
            dtype="bf16",
            eval_temperature=0.0,
        )
    )


def test_config_to_dict_records_every_field():
    cfg = parse_train_args(["learning_rate=3e-4", "task=sft", "max_steps=7"])
    d = config_to_dict(cfg)
    assert set(d) == EXPECTED_FIELDS
    assert d["learning_rate"] == pytest.approx(3e-4) and d["task"] == "sft" and d["max_steps"] == 7
    assert json.loads(json.dumps(d)) == d


def test_enumerations_follow_the_cookbook_and_the_method_registry():
    """The Literal settings agree with the cookbook types they stand for and with the methods that exist."""
    import typing

    import tinker
    from tinker_cookbook.renderers import TrainOnWhat
    from tinker_cookbook.utils.lr_scheduling import LRSchedule

    from posttrain.config.checks import choices
    from posttrain.pipeline.methods import METHODS
    from posttrain.pipeline.methods.options import RLLossFn
    from posttrain.pipeline.methods.sft import TrainOnWhatName
    from posttrain.pipeline.settings import TaskName

    assert typing.get_type_hints(TrainConfig)["lr_schedule"] is LRSchedule
    assert set(choices(RLLossFn)) == set(typing.get_args(tinker.types.LossFnType)) - {
        "cross_entropy",
        "custom",
    }
    assert set(choices(TrainOnWhatName)) == {t.value for t in TrainOnWhat} - {"customized"}
    assert set(choices(TaskName)) == {"auto", *METHODS}


@pytest.mark.parametrize(
    "arg", ["task=pretrain", "distillation_mode=offline", "backend=gpu", "loss_fn=grpo", "dtype=fp16"]
)
def test_enumerated_values_from_the_command_line_name_the_allowed_ones(arg):
    key = arg.split("=")[0]
    with pytest.raises(ConfigError, match=f"^{key}=.* is not valid; allowed values: "):
        parse_train_args([arg])


def test_parsing_the_settings_imports_no_heavy_library():
    """Bad settings are reported in a fraction of a second (0.25 s here), and the Hub check comes first: parsing
    imports no torch, SDK, cookbook loop or Hub library (importing them took 4 s, and the Hub libraries read
    HF_HUB_OFFLINE once, at import)."""
    import subprocess
    import sys

    code = (
        "import sys; from posttrain.pipeline.settings import parse_train_args; "
        "parse_train_args(['task=distillation', 'teacher_model=t', 'batch_size=4']); "
        "heavy = ('torch', 'tinker', 'datasets', 'transformers', 'huggingface_hub'); "
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
