"""The method registry and the choices made before anything is spent: which method, which backend, which
problems, and how answers are graded (the cookbook's math grader)."""

import pytest

from posttrain.config import TrainConfig
from posttrain.errors import ConfigError
from posttrain.pipeline.data import LoadedData
from posttrain.pipeline.envs.registry import load_problems
from posttrain.pipeline.methods import METHODS, method_class
from posttrain.pipeline.methods.rl import RL
from posttrain.pipeline.methods.sft import SFT
from posttrain.pipeline.run import choose_task, default_learning_rate
from posttrain.pipeline.scoring.grading import extract_answer, final_answer, grade
from posttrain.pipeline.setup import backend

CHAT = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
QA = [{"question": "What is 2+2?", "answer": "#### 4", "final_answer": "4"}]


def _data(fmt: str, rows: list[dict]) -> LoadedData:
    return LoadedData(fmt, rows * 3, rows, "data.jsonl (local file)", "10% of training rows", [])


def test_every_method_follows_the_interface():
    for name in METHODS:
        method = method_class(name)
        assert method.name == name
        assert method.metric in ("nll", "score")
        assert isinstance(method.score_label, str) and method.score_label
        for attr in ("prepare", "evaluate", "train", "token_budget", "score_text", "describe"):
            assert callable(getattr(method, attr)), f"{name}.{attr}"


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
    assert choose_task(TrainConfig(**settings), data) == expected


def test_choose_task_picks_dpo_for_preference_pairs():
    assert choose_task(TrainConfig(), _data("preference", [{"prompt": [], "chosen": "a", "rejected": "b"}])) == "dpo"


def test_a_method_refuses_data_of_the_wrong_shape_in_one_line():
    with pytest.raises(ConfigError, match="task=sft needs chat data.*question_answer format") as exc:
        SFT(TrainConfig(task="sft"), _data("question_answer", QA))
    assert "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match="env=math needs a dataset with question/answer"):
        RL(TrainConfig(task="rl"), _data("messages", CHAT))


def test_rl_problems_from_each_source():
    qa = load_problems(TrainConfig(), _data("question_answer", QA))
    assert qa.train[0] == {"question": "What is 2+2?", "answer": "4", "grader": "math"}
    arith = load_problems(TrainConfig(env="arithmetic", batch_size=4, max_steps=2), None)
    assert len(arith.train) == 64 and arith.train != arith.eval
    gym = load_problems(TrainConfig(env="reasoning_gym:leg_counting", batch_size=2, max_steps=2), None)
    assert gym.train[0]["grader"] == "reasoning_gym:leg_counting" and len(gym.eval) == 50
    assert [p["question"] for p in gym.train[:5]] != [p["question"] for p in gym.eval[:5]]  # other seed
    with pytest.raises(ConfigError, match="reasoning_gym:no_such_task"):
        load_problems(TrainConfig(env="reasoning_gym:no_such_task"), None)


def test_choose_backend(monkeypatch):
    monkeypatch.delenv("TINKER_API_KEY", raising=False)
    assert backend.choose_backend(TrainConfig()) == "local"
    assert backend.choose_backend(TrainConfig(model_name="Qwen/Qwen3-8B")) == "local"  # no key
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


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("so the total is 12.\n#### 12", "12"),
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
    assert grade({"answer": truth, "grader": "math"}, given) is correct


def test_reference_final_answers():
    assert final_answer("Natalia sold 48 + 24 = 72 clips.\n#### 1,072") == "1072"
    assert final_answer("so $x = \\boxed{5}$") == "5"
    assert final_answer("  Paris ") == "Paris"


def test_pinned_reasoning_gym_task_names_match_its_registry():
    import reasoning_gym.factory

    from posttrain.pipeline.envs.registry import REASONING_GYM_TASKS

    assert set(reasoning_gym.factory.DATASETS) == REASONING_GYM_TASKS


def test_a_mistyped_reasoning_gym_task_gets_suggestions():
    with pytest.raises(ConfigError, match="no such reasoning-gym task; did you mean leg_counting"):
        load_problems(TrainConfig(env="reasoning_gym:leg_countin"), None)
