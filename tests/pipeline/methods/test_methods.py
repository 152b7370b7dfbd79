"""The method registry and the choices made before anything is spent: which method, which backend, which
problems, and how answers are graded (the cookbook's math grader)."""

import chz
import pytest

from posttrain.config.run import RunSettings
from posttrain.errors import ConfigError, PreflightError
from posttrain.pipeline.data import LoadedData
from posttrain.pipeline.data.formats import FormatName
from posttrain.pipeline.envs import registry
from posttrain.pipeline.envs.base import ProblemSet
from posttrain.pipeline.methods import METHODS, config_class, method_class
from posttrain.pipeline.methods.choice import choose_task, default_learning_rate
from posttrain.pipeline.methods.rl import RL, RLConfig
from posttrain.pipeline.methods.sft import SFT, SFTConfig
from posttrain.pipeline.scoring.grading import extract_answer, final_answer, grade_math
from posttrain.pipeline.settings import TrainConfig
from posttrain.pipeline.setup import backend

CHAT = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
QA = [{"question": "What is 2+2?", "answer": "#### 4", "final_answer": "4"}]


def _data(fmt: str, rows: list[dict]) -> LoadedData:
    return LoadedData(fmt, rows * 3, rows, "data.jsonl (local file)", "10% of training rows", [])


def load_problems(env: str, data: LoadedData | None = None, **settings) -> ProblemSet:
    spec = registry.check(env)
    return registry.environment(spec).problems(spec, RLConfig(**settings), data)


def test_every_registry_line_is_a_method_with_its_own_settings():
    import typing

    for name, entry in METHODS.items():
        assert callable(method_class(name)), name
        config = config_class(name)
        fields = set(chz.chz_fields(config))
        assert issubclass(config, RunSettings) and set(chz.chz_fields(RunSettings)) <= fields, name
        assert set(entry.chosen_by) <= fields, f"{name}: task=auto would read settings it does not take"
        assert entry.formats <= set(typing.get_args(FormatName)), name
    for factory in (SFT, RL):
        assert factory.metric in ("nll", "score")
        for attr in ("prepare", "evaluate", "train", "token_budget", "score_text", "describe"):
            assert callable(getattr(factory, attr)), f"{factory.__name__}.{attr}"


@pytest.mark.parametrize(
    "settings, data, expected",
    [
        ({}, _data("messages", CHAT), "sft"),
        ({}, _data("sharegpt", CHAT), "sft"),
        ({}, _data("question_answer", QA), "rl"),
        ({"env": "arithmetic"}, None, "rl"),
        ({"env": "math"}, _data("question_answer", QA), "rl"),
        ({"task": "sft"}, _data("messages", CHAT), "sft"),
    ],
)
def test_choose_task(settings, data, expected):
    assert choose_task(TrainConfig(**settings), data)[0] == expected


def test_choose_task_picks_dpo_for_preference_pairs():
    pairs = _data("preference", [{"prompt": [], "chosen": "a", "rejected": "b"}])
    assert choose_task(TrainConfig(), pairs) == ("dpo", "preference data")


def test_a_method_refuses_data_of_the_wrong_shape_in_one_line():
    with pytest.raises(ConfigError, match="task=sft needs chat data.*question_answer format") as exc:
        SFT(SFTConfig(), _data("question_answer", QA))
    assert "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match="env=math needs a dataset with question/answer"):
        RL(RLConfig(), _data("messages", CHAT))


def test_rl_problems_from_each_source():
    qa = load_problems("math", _data("question_answer", QA))
    assert {k: qa.train[0][k] for k in ("question", "answer", "grader")} == {
        "question": "What is 2+2?",
        "answer": "4",
        "grader": "math",
    }
    arith = load_problems("arithmetic", batch_size=4, max_steps=2)
    assert len(arith.train) == 64 and arith.train != arith.eval
    gym = load_problems("reasoning_gym:leg_counting", batch_size=2, max_steps=2)
    assert (gym.train[0]["grader"], gym.train[0]["task"]) == ("reasoning_gym", "leg_counting") and len(
        gym.eval
    ) == 50
    assert [p["question"] for p in gym.train[:5]] != [p["question"] for p in gym.eval[:5]]  # other seed
    with pytest.raises(ConfigError, match="reasoning_gym:no_such_task"):
        load_problems("reasoning_gym:no_such_task")


def test_choose_backend(monkeypatch):
    monkeypatch.delenv("TINKER_API_KEY", raising=False)
    assert backend.choose_backend(TrainConfig()) == "local"
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "w")
    # A lineup model with no copy here and no key: stop and ask, naming every missing key (not WANDB_API_KEY).
    with pytest.raises(PreflightError) as stop:
        backend.choose_backend(TrainConfig(model_name="Qwen/Qwen3-8B"))
    message = str(stop.value)
    assert (
        "Missing required environment variables: TINKER_API_KEY, WANDB_PROJECT (set them in .env" in message
    )
    assert "pass backend=local" in message and "\n" not in message
    # on purpose
    assert backend.choose_backend(TrainConfig(backend="local", model_name="Qwen/Qwen3-8B")) == "local"
    assert backend.choose_backend(TrainConfig(base_url="https://tinker.example.com")) == "tinker"
    assert backend.choose_backend(TrainConfig(base_url="http://127.0.0.1:8000")) == "local"
    monkeypatch.setenv("TINKER_API_KEY", "tml-x")
    assert backend.choose_backend(TrainConfig(model_name="Qwen/Qwen3-8B")) == "tinker"
    assert backend.choose_backend(TrainConfig()) == "local"  # SmolLM2 is not in the lineup
    assert backend.choose_backend(TrainConfig(backend="local", model_name="Qwen/Qwen3-8B")) == "local"


def test_default_learning_rate_sources():
    lr, source = default_learning_rate("meta-llama/Llama-3.1-8B", "sft")
    assert source == "tinker_cookbook.hyperparam_utils.get_lr" and 0 < lr < 1e-2
    lr_rl, source_rl = default_learning_rate("meta-llama/Llama-3.1-8B", "rl")
    assert lr_rl == pytest.approx(lr / 2) and source_rl.endswith("/ 2 for RL")
    assert default_learning_rate("HuggingFaceTB/SmolLM2-135M-Instruct", "sft")[0] == 5e-4
    # DPO: a tenth of the supervised rate (after its SFT stage at the supervised rate)
    lr_dpo, source_dpo = default_learning_rate("meta-llama/Llama-3.1-8B", "dpo")
    assert lr_dpo == pytest.approx(lr / 10) and source_dpo.endswith("/ 10 for DPO")
    assert default_learning_rate("HuggingFaceTB/SmolLM2-135M-Instruct", "dpo")[0] == 5e-5


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("so the total is 12.\n#### 12", "12"),
        ("#### 5 + 10 = 15", "15"),  # the working after '####': its result is the answer
        ("#### 8 - 2 = 4\nmore", "4"),
        ("#### x = 5", "x = 5"),  # not arithmetic on the left: left to the grader as written
        ("We get \\boxed{\\frac{1}{2}} in the end", "\\frac{1}{2}"),
        ("The answer is 7.", "7"),
        ("first 3 then 41", "41"),
        ("The answer: 9", "9"),
        ("I'll provide an answer. I already gave 6 + 2 = 8", "8"),
        ("no digits here\nParis", "Paris"),
        ("", ""),
    ],
)
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


@pytest.mark.parametrize(
    "given, truth, correct",
    [
        ("12", "12.0", True),
        ("1/2", "0.5", True),
        ("\\frac{1}{2}", "1/2", True),  # sympy equivalence, beyond a numeric comparison
        ("3,000", "3000", True),
        ("x^2+2x+1", "(x+1)^2", True),
        ("12", "13", False),
        ("", "0", False),
    ],
)
def test_math_grading_uses_the_cookbook_grader(given, truth, correct):
    assert grade_math({"answer": truth, "grader": "math"}, given) is correct


def test_reference_final_answers():
    assert final_answer("Natalia sold 48 + 24 = 72 clips.\n#### 1,072") == "1072"
    assert final_answer("so $x = \\boxed{5}$") == "5"
    assert final_answer("  Paris ") == "Paris"


def test_pinned_reasoning_gym_task_names_match_its_registry():
    import reasoning_gym.factory

    from posttrain.pipeline.envs.qa import REASONING_GYM_TASKS

    assert set(reasoning_gym.factory.DATASETS) == REASONING_GYM_TASKS


def test_a_mistyped_reasoning_gym_task_gets_suggestions():
    with pytest.raises(ConfigError, match="no such reasoning-gym task; did you mean leg_counting"):
        load_problems("reasoning_gym:leg_countin")
