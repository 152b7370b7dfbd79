"""The chunked unembedding of `training.forward_backward`: log-probs, losses and gradients equal the unchunked
computation (full logits, log-softmax, gather), for 1-D and 2-D targets, every built-in loss, fp32 and bf16."""

from __future__ import annotations

import pytest
import torch

from posttrain.engine import head, training
from posttrain.engine.losses import get_loss
from posttrain.engine.models import ModelSource
from posttrain.engine.runtime import LoraSpec, ServedModel, TrainingRun
from posttrain.engine.training import new_optimizer
from posttrain.engine.wire import FwdBwdDatum, FwdBwdRequest


def _served(tiny_model: str, dtype: torch.dtype) -> tuple[ServedModel, TrainingRun]:
    base = ServedModel(ModelSource(name="tiny", path=__import__("pathlib").Path(tiny_model)), dtype)
    assert base.plain_head
    base.add_adapter("run0", LoraSpec(rank=4, seed=0))
    with torch.no_grad():  # B starts at zero: make every LoRA factor matter, so every gradient is non-trivial
        gen = torch.Generator().manual_seed(1)
        for p in base.adapter_params("run0"):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    run = TrainingRun("m", base, LoraSpec(rank=4), "run0", new_optimizer(base.adapter_params("run0")))
    return base, run


def _data(loss: str) -> list[FwdBwdDatum]:
    gen = torch.Generator().manual_seed(2)
    data = []
    for n, k in ((9, 0), (5, 0), (12, 0), (7, 3)):
        tokens = torch.randint(0, 49152, (n,), generator=gen).tolist()
        shape = (n,) if k == 0 else (n, k)
        inputs = {"target_tokens": torch.randint(0, 49152, shape, generator=gen)}
        if loss == "cross_entropy":
            if n != 5:  # one datum without weights: every token counts
                inputs["weights"] = torch.rand(shape, generator=gen)
        else:
            inputs["logprobs"] = -torch.rand(shape, generator=gen) * 10
            inputs["advantages"] = torch.randn(shape, generator=gen)
        data.append(FwdBwdDatum(tokens=tokens, inputs=inputs))
    return data


def _reference(base: ServedModel, run: TrainingRun, data: list[FwdBwdDatum], loss: str):
    """The unchunked computation, datum by datum: the model's own full logits, log_softmax, gather."""
    base.activate(run.adapter)
    loss_fn = get_loss(loss)
    lps, losses, total = [], [], 0.0
    for d in data:
        with base.autocast:
            logits = base.peft(input_ids=torch.tensor([d.tokens]), use_cache=False).logits[0].float()
        t = d.inputs["target_tokens"]
        lp = torch.log_softmax(logits, dim=-1).gather(-1, t.view(t.shape[0], -1))
        lp = lp[:, 0] if t.dim() == 1 else lp
        inputs = {k: v.float() for k, v in d.inputs.items() if k != "target_tokens"}
        per_token = loss_fn(lp, inputs, {})
        per_token.sum().backward()
        total += float(per_token.detach().sum())
        lps.append(lp.detach())
        losses.append(per_token.detach())
    grads = [p.grad.clone() for p in run.params()]
    for p in run.params():
        p.grad = None
    return lps, losses, total, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss", ["cross_entropy", "ppo"])
def test_chunked_head_equals_unchunked_values_and_grads(tiny_model, monkeypatch, dtype, loss):
    base, run = _served(tiny_model, dtype)
    data = _data(loss)
    ref_lps, ref_losses, ref_total, ref_grads = _reference(base, run, data, loss)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=0.05, atol=0.05)
    for chunk in ("5", "1000000"):  # many chunks (one straddles datums) and a single one
        monkeypatch.setenv("POSTTRAIN_LOGITS_CHUNK_TOKENS", chunk)
        outputs, metrics = training.forward_backward(run, FwdBwdRequest("m", 0, loss, data=data))
        for out, lp, per_token in zip(outputs, ref_lps, ref_losses, strict=True):
            assert out["logprobs"].shape == tuple(lp.shape)
            torch.testing.assert_close(torch.from_numpy(out["logprobs"]), lp, **tol)
            torch.testing.assert_close(torch.from_numpy(out["elementwise_loss"]), per_token, **tol)
        assert metrics["loss:sum"] == pytest.approx(ref_total, rel=1e-4 if dtype == torch.float32 else 0.02)
        for p, g in zip(run.params(), ref_grads, strict=True):
            assert p.grad is not None
            scale = float(g.abs().max())
            torch.testing.assert_close(p.grad, g, rtol=tol["rtol"], atol=tol["atol"] * max(scale, 1e-3))
            p.grad = None
        # forward only: the same values, no gradients
        outputs, _ = training.forward_backward(run, FwdBwdRequest("m", 0, loss, forward_only=True, data=data))
        torch.testing.assert_close(torch.from_numpy(outputs[0]["logprobs"]), ref_lps[0], **tol)
        assert all(p.grad is None for p in run.params())


def test_a_model_that_cannot_keep_packed_datums_apart_gets_them_one_per_sequence(tiny_model, monkeypatch):
    base, run = _served(tiny_model, torch.float32)
    assert base.packs_sequences  # transformers masks attention where positions restart
    import transformers.masking_utils

    # A model that ignores restarting positions would let a packed datum attend to the one before it.
    monkeypatch.setattr(transformers.masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    base, run = _served(tiny_model, torch.float32)
    assert not base.packs_sequences
    data = _data("cross_entropy")
    ref_lps, _, ref_total, _ = _reference(base, run, data, "cross_entropy")
    outputs, metrics = training.forward_backward(run, FwdBwdRequest("m", 0, "cross_entropy", data=data))
    for out, lp in zip(outputs, ref_lps, strict=True):
        torch.testing.assert_close(torch.from_numpy(out["logprobs"]), lp, rtol=1e-4, atol=1e-4)
    assert metrics["loss:sum"] == pytest.approx(ref_total, rel=1e-4)


def test_chunks_bound_the_logits(tiny_model):
    base, _ = _served(tiny_model, torch.float32)
    assert head.logits_chunk_tokens(base.vocab_size) * base.vocab_size <= head.LOGITS_CHUNK_ELEMENTS


def test_device_choice_without_a_gpu_and_with_one():
    from posttrain.engine.models import choose_device, choose_dtype
    from posttrain.errors import UserError

    assert choose_device("cpu").type == "cpu"
    assert choose_dtype("fp32", torch.device("cpu")) == torch.float32
    if torch.cuda.is_available():
        assert choose_device("auto").type == "cuda"
        want = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        assert choose_dtype("auto", torch.device("cuda")) == want
    else:
        assert choose_device("auto").type == "cpu"
        with pytest.raises(UserError, match="CUDA is not available"):
            choose_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_and_sampling_on_cuda_match_the_cpu(tiny_model):
    from posttrain.engine.sampling import Decoding, GenerationRequest, SamplingSpec, generate

    data = _data("cross_entropy")
    results = {}
    for device in ("cpu", "cuda"):
        base = ServedModel(
            ModelSource(name="tiny", path=__import__("pathlib").Path(tiny_model)), torch.float32, device
        )
        base.add_adapter("run0", LoraSpec(rank=4, seed=0))
        run = TrainingRun("m", base, LoraSpec(rank=4), "run0", new_optimizer(base.adapter_params("run0")))
        outputs, _ = training.forward_backward(run, FwdBwdRequest("m", 0, "cross_entropy", data=data))
        training.optim_step(run, {"learning_rate": 1e-2, "grad_clip_norm": 1.0})
        assert all(p.device.type == device for p in run.params())
        state = run.adapter_state()
        assert all(v.device.type == "cpu" for v in state.values())  # checkpoints are written from the CPU
        with base.sampling_model(None) as module:
            [sampled] = generate(
                module,
                [GenerationRequest(data[0].tokens, 2, SamplingSpec(max_tokens=8, temperature=0.0))],
                Decoding(base.eos_token_ids, torch.float32, base.max_context, base.tokenizer),
            )
        results[device] = (outputs, state, sampled)
    for a, b in zip(results["cpu"][0], results["cuda"][0], strict=True):
        torch.testing.assert_close(
            torch.from_numpy(a["logprobs"]), torch.from_numpy(b["logprobs"]), rtol=1e-3, atol=1e-3
        )
    for k, v in results["cpu"][1].items():
        torch.testing.assert_close(v, results["cuda"][1][k], rtol=1e-2, atol=1e-4)
    assert [s.tokens for s in results["cpu"][2].sequences] == [s.tokens for s in results["cuda"][2].sequences]
