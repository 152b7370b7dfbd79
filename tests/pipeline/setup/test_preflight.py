import os
import sys
from pathlib import Path

import pytest

from posttrain.config.renderers import BUILTIN_RENDERERS, resolve_renderer
from posttrain.errors import PreflightError
from posttrain.pipeline.setup.backend import check_model
from posttrain.pipeline.setup.preflight import (
    REQUIRED_ENV_VARS,
    check_credentials,
    cookbook_models,
    load_env,
)
from posttrain.util import redact

TINKER_SECRET = "tk-SECRET-0123456789abcdef"
WANDB_SECRET = "wb-SECRET-fedcba9876543210"


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No credentials in the environment (restored after the test, even if load_env sets them) and cwd=tmp."""
    for name in (*REQUIRED_ENV_VARS, "WANDB_MODE", "WANDB_DIR"):
        monkeypatch.setenv(name, "placeholder")  # recorded, so teardown restores the real state
        monkeypatch.delenv(name)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_offline_model_list_is_the_cookbooks_model_table():
    from tinker_cookbook import model_info

    table = cookbook_models()
    # Every model of the user's document's table is one the cookbook knows, and so are today's.
    for name in (
        "Qwen/Qwen3-8B",
        "Qwen/Qwen3-VL-30B-A3B-Instruct",
        "openai/gpt-oss-20b",
        "meta-llama/Llama-3.2-1B",
        "moonshotai/Kimi-K2-Thinking",
        "Qwen/Qwen3.5-9B",
        "moonshotai/Kimi-K2.6",
    ):
        assert name in table and table[name] == model_info.get_model_attributes(name), name
    assert not table["meta-llama/Llama-3.2-1B"].is_chat and table["Qwen/Qwen3-VL-30B-A3B-Instruct"].is_vl
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" not in table


def test_load_env_reads_dotenv_and_returns_only_booleans(clean_env):
    (clean_env / ".env").write_text(
        f"TINKER_API_KEY={TINKER_SECRET}\nWANDB_API_KEY={WANDB_SECRET}\nWANDB_PROJECT=my-project\n"
    )
    status = load_env()
    assert status == {"TINKER_API_KEY": True, "WANDB_API_KEY": True, "WANDB_PROJECT": True}
    assert all(isinstance(v, bool) for v in status.values())
    assert TINKER_SECRET not in repr(status) and WANDB_SECRET not in repr(status)
    assert os.environ["TINKER_API_KEY"] == TINKER_SECRET and os.environ["WANDB_PROJECT"] == "my-project"


def test_load_env_does_not_override_the_environment_but_fills_empty(clean_env, monkeypatch):
    env_file = clean_env / "custom.env"
    env_file.write_text("WANDB_PROJECT=from-file\nTINKER_API_KEY=from-file-key\n")
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    monkeypatch.setenv("TINKER_API_KEY", "")
    status = load_env(env_file)
    assert os.environ["WANDB_PROJECT"] == "from-env"
    assert os.environ["TINKER_API_KEY"] == "from-file-key"
    assert status == {"TINKER_API_KEY": True, "WANDB_API_KEY": False, "WANDB_PROJECT": True}


def test_load_env_without_file_reports_missing(clean_env):
    assert load_env(clean_env / "nope.env") == dict.fromkeys(REQUIRED_ENV_VARS, False)


def test_tinker_backend_lists_missing_names_never_values(clean_env, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", WANDB_SECRET)
    with pytest.raises(PreflightError) as exc:
        check_credentials("tinker")
    msg = str(exc.value)
    assert (
        msg
        == f"Missing required environment variables: TINKER_API_KEY, WANDB_PROJECT (set them in .env in {Path.cwd()})"
    )
    assert WANDB_SECRET not in msg


def test_tinker_backend_missing_one_with_secret_present(clean_env, monkeypatch):
    monkeypatch.setenv("TINKER_API_KEY", TINKER_SECRET)
    monkeypatch.setenv("WANDB_API_KEY", WANDB_SECRET)
    monkeypatch.setenv("WANDB_PROJECT", "   ")  # blank counts as missing
    with pytest.raises(PreflightError) as exc:
        check_credentials("tinker")
    assert "Missing required environment variables: WANDB_PROJECT (" in str(exc.value)
    assert TINKER_SECRET not in str(exc.value) and WANDB_SECRET not in str(exc.value)


def test_tinker_backend_all_set(clean_env, monkeypatch):
    monkeypatch.setenv("TINKER_API_KEY", TINKER_SECRET)
    monkeypatch.setenv("WANDB_API_KEY", WANDB_SECRET)
    monkeypatch.setenv("WANDB_PROJECT", "proj")
    notes = check_credentials("tinker")
    assert notes and any("proj" in n for n in notes)
    assert not any(TINKER_SECRET in n or WANDB_SECRET in n for n in notes)


def test_tinker_backend_says_wandb_offline_when_asked(clean_env, monkeypatch):
    """WANDB_MODE=offline wins over a set WANDB_API_KEY (tracking.wandb_mode), and the preflight says so."""
    from posttrain.pipeline.tracking import wandb_mode

    for name, value in (
        ("TINKER_API_KEY", TINKER_SECRET),
        ("WANDB_API_KEY", WANDB_SECRET),
        ("WANDB_PROJECT", "p"),
    ):
        monkeypatch.setenv(name, value)
    assert wandb_mode() == "online" and "W&B: online, project 'p'" in check_credentials("tinker")
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode() == "offline"
    assert "W&B: offline (WANDB_MODE=offline), project 'p'" in check_credentials("tinker")


def test_local_backend_needs_nothing_and_explains_offline_wandb(clean_env):
    notes = check_credentials("local")
    text = "\n".join(notes)
    assert "offline" in text and "wandb sync" in text and "WANDB_PROJECT" in text


def test_local_backend_online_when_key_present(clean_env, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", WANDB_SECRET)
    notes = check_credentials("local")
    assert any("online" in n for n in notes) and not any(WANDB_SECRET in n for n in notes)


def test_check_model_offline_uses_the_cookbook_table():
    check_model("Qwen/Qwen3.5-9B", "tinker", None)
    with pytest.raises(PreflightError) as exc:
        check_model("HuggingFaceTB/SmolLM2-135M-Instruct", "tinker", None)
    msg = str(exc.value)
    assert "SmolLM2" in msg and "tinker-cookbook 0.6.1's model table" in msg and "Qwen/Qwen3.5-9B" in msg


def test_check_model_uses_server_capabilities_when_given():
    check_model("Qwen/Qwen3-8B", "tinker", ["Qwen/Qwen3-8B", "meta-llama/Llama-3.2-1B"])
    with pytest.raises(PreflightError) as exc:
        check_model("Qwen/Qwen3-32B", "tinker", ["Qwen/Qwen3-8B"])
    assert "Available: Qwen/Qwen3-8B" in str(exc.value)


def test_check_model_local_engine():
    check_model("HuggingFaceTB/SmolLM2-135M-Instruct", "local", ["HuggingFaceTB/SmolLM2-135M-Instruct"])
    with pytest.raises(PreflightError) as exc:
        check_model("Qwen/Qwen3-8B", "local", ["HuggingFaceTB/SmolLM2-135M-Instruct"])
    assert "local engine" in str(exc.value) and "SmolLM2-135M-Instruct" in str(exc.value)


def test_resolve_renderer(clean_env):
    assert resolve_renderer("Qwen/Qwen3-8B", "llama3") == ("llama3", "explicit")
    assert resolve_renderer("Qwen/Qwen3-8B", None) == ("qwen3", "cookbook recommendation")
    assert resolve_renderer("meta-llama/Llama-3.1-8B-Instruct", None) == ("llama3", "cookbook recommendation")
    assert resolve_renderer("Qwen/Qwen3-4B-Instruct-2507", None)[0] == "qwen3_instruct"
    name, source = resolve_renderer("HuggingFaceTB/SmolLM2-135M-Instruct", None)
    assert name == "qwen3_instruct" and source.startswith("fallback: ") and "ChatML" in source
    name, source = resolve_renderer("someorg/mystery-7b", None)
    assert name == "role_colon" and source.startswith("fallback: ")
    with pytest.raises(PreflightError, match="not-a-renderer"):
        resolve_renderer("Qwen/Qwen3-8B", "not-a-renderer")


def test_builtin_renderer_names_match_the_cookbook_dispatch(clean_env):
    names = BUILTIN_RENDERERS
    spec_table = [
        "llama3",
        "qwen3",
        "qwen3_instruct",
        "qwen3_disable_thinking",
        "qwen3_vl",
        "qwen3_vl_instruct",
        "deepseekv3",
        "deepseekv3_thinking",
        "gpt_oss_low_reasoning",
        "gpt_oss_medium_reasoning",
        "gpt_oss_high_reasoning",
        "kimi_k2",
        "role_colon",
    ]
    assert set(spec_table) <= set(names)
    from tinker_cookbook import renderers

    for name in names:  # every pinned name really is dispatched by get_renderer
        try:
            renderers.get_renderer(name, tokenizer=None)
        except Exception as e:
            assert "Unknown renderer" not in str(e), name
    with pytest.raises(Exception, match="Unknown renderer"):
        renderers.get_renderer("definitely_not_a_renderer", tokenizer=None)

    renderers.register_renderer("posttrain-test/custom", lambda tok, img: None)
    try:
        assert resolve_renderer("Qwen/Qwen3-8B", "posttrain-test/custom") == (
            "posttrain-test/custom",
            "explicit",
        )
    finally:
        renderers.unregister_renderer("posttrain-test/custom")


def test_smollm2_fallback_renderer_matches_its_chat_template(clean_env):
    """qwen3_instruct must produce exactly the tokens of SmolLM2's own ChatML template (cached tokenizer only)."""
    pytest.importorskip("transformers")
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download("HuggingFaceTB/SmolLM2-135M-Instruct", local_files_only=True)
    except Exception:
        pytest.skip("SmolLM2 tokenizer not in the local HF cache")
    from tinker_cookbook.renderers import get_renderer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(local)
    renderer = get_renderer(resolve_renderer("HuggingFaceTB/SmolLM2-135M-Instruct", None)[0], tok)
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
    ]

    def ids(x):
        return list(x["input_ids"] if hasattr(x, "keys") else x)

    reference = ids(tok.apply_chat_template(msgs, tokenize=True))
    rendered, _weights = renderer.build_supervised_example(msgs)
    assert rendered.to_ints() == reference[: len(rendered.to_ints())]
    prompt = renderer.build_generation_prompt(msgs[:2]).to_ints()
    assert prompt == ids(tok.apply_chat_template(msgs[:2], tokenize=True, add_generation_prompt=True))
    assert renderer.get_stop_sequences() == [tok.convert_tokens_to_ids("<|im_end|>")]


def test_redact(monkeypatch):
    monkeypatch.setenv("TINKER_API_KEY", TINKER_SECRET)
    monkeypatch.setenv("WANDB_API_KEY", WANDB_SECRET)
    text = f"auth {TINKER_SECRET} and {WANDB_SECRET}!"
    out = redact(text)
    assert out == "auth *** and ***!"
    monkeypatch.delenv("TINKER_API_KEY")
    monkeypatch.delenv("WANDB_API_KEY")
    assert redact(text) == text


def test_a_lineup_model_without_keys_stops_and_asks(tmp_path: Path):
    """backend=auto, a lineup model with no copy on this machine, no .env: stop before anything starts, naming
    every missing key and the way to train here on purpose (the bundled model needs none: test_choose_backend)."""
    from runs import train_here

    keys = ("TINKER_API_KEY", "WANDB_API_KEY", "WANDB_PROJECT")
    proc = train_here(["model_name=Qwen/Qwen3-8B"], tmp_path, unset=keys)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.strip() == (
        "error: model_name=Qwen/Qwen3-8B trains on the Tinker service: Missing required environment variables: "
        f"TINKER_API_KEY, WANDB_API_KEY, WANDB_PROJECT (set them in .env in {tmp_path} and run again; to train it "
        "on this machine instead, on purpose, pass backend=local)"
    )
    assert "engine" not in proc.stdout and not (tmp_path / "results").exists()


HUB_UNREACHABLE = """
import os, socket

def unreachable(*args, **kwargs):  # this machine's network, with the Hub out of reach
    raise OSError("Network is unreachable")

socket.create_connection = unreachable
for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.pop(name, None)
from posttrain.cli.main import main

code = main(["train", "dataset=/nonexistent/rows.jsonl", "backend=local"])
import datasets.config
import huggingface_hub.constants

print(code, huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE)
"""


def test_an_unreachable_hub_is_known_before_the_hub_libraries_are_imported(tmp_path: Path):
    """They read HF_HUB_OFFLINE once, at import; set later, every file of a tokenizer was retried for a minute."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", HUB_UNREACHABLE], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert out.stdout.strip().splitlines()[-1] == "2 True True", out.stdout + out.stderr


@pytest.mark.parametrize("prefix", [["train.py"], ["posttrain", "train"]])
def test_the_resume_command_is_the_same_settings_for_train_py(monkeypatch, prefix: list[str]):
    """Printed when a run stops: `uv run python train.py` with the run's settings, however it was started
    (`posttrain train ...` too: its subcommand is not a setting), its run_name and resume=true."""
    from posttrain.pipeline.setup.resume import resume_command

    monkeypatch.setattr(sys, "argv", [*prefix, "env=arithmetic", "run_name=old", "max_steps=3"])
    assert resume_command("r1") == "uv run python train.py env=arithmetic max_steps=3 run_name=r1 resume=true"
