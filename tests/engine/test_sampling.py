"""Tests of the engine's batched generation core (`posttrain.engine.sampling`), on a tiny random Llama."""

from __future__ import annotations

import copy
import inspect
import math
import time
from collections.abc import Callable, Iterator

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.cache_utils import CacheLayerMixin, DynamicLayer

from posttrain.engine import sampling
from posttrain.engine.sampling import (
    Decoding,
    GeneratedSequence,
    GenerationRequest,
    GenerationResult,
    SamplingSpec,
    generate,
)
from posttrain.engine.sampling import cache as ragged
from posttrain.engine.sampling import model as sampling_model
from posttrain.engine.sampling import tokens as sampling_tokens
from posttrain.engine.sampling.model import Prefill
from posttrain.engine.sampling.tokens import StopStringMatcher
from posttrain.util import round_up

_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, this is a tiny tokenizer for tests!",
    "User: what is 2+2?\n\nAssistant: 4",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z 0 1 2 3 4 5 6 7 8 9",
    "caf\u00e9 na\u00efve \u65e5\u672c \u00fcber",  # multi-byte characters: some tokens are partial UTF-8
]
MAX_CONTEXT = 512


# ----------------------------------------------------------------------------------------------------------
# Fixtures and reference implementations


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """The models here are tiny: one thread is faster, and robust to other processes using the cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=160, special_tokens=["<eos>"], show_progress=False)
    tok.train_from_iterator(_CORPUS * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def _tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_CONTEXT,
        initializer_range=0.1,  # spread-out logits: no near-ties that would make greedy comparisons flaky
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    return _tiny_llama(len(tokenizer))


@pytest.fixture(scope="module")
def lora_model(model: LlamaForCausalLM) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(copy.deepcopy(model), config).eval()


def _prompts(tokenizer: PreTrainedTokenizerFast) -> list[list[int]]:
    texts = ["hello", "the quick brown fox", "User: what is", "a b c d e f g h i j k", "dog", "z"]
    return [tokenizer.encode(t) for t in texts]


def _run(
    model: torch.nn.Module,
    requests: list[GenerationRequest],
    tokenizer: PreTrainedTokenizerFast,
    *,
    compute_dtype: torch.dtype = torch.float32,
    max_context: int = MAX_CONTEXT,
    **kwargs: object,
) -> list[GenerationResult]:
    decoding = Decoding([tokenizer.eos_token_id], compute_dtype, max_context, tokenizer, **kwargs)  # type: ignore[arg-type]
    return generate(model, requests, decoding)


def _greedy(
    max_tokens: int | None, stop_token_ids: list[int] | None = None, **kwargs: object
) -> SamplingSpec:
    return SamplingSpec(max_tokens=max_tokens, temperature=0.0, stop_token_ids=stop_token_ids, **kwargs)  # type: ignore[arg-type]


def _autocast(dtype: torch.dtype) -> torch.autocast:
    return torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)


def reference_greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """Step-by-step argmax decode, one sequence, a full forward pass per step, no cache."""
    tokens = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([tokens]), use_cache=False).logits[0, -1]
            tokens.append(int(logits.float().argmax()))
    return tokens[len(prompt) :]


def reference_logprobs(
    model: torch.nn.Module, tokens: list[int], compute_dtype: torch.dtype = torch.float32
) -> list[float]:
    """logprob of tokens[i] given tokens[:i], i >= 1, from one full forward pass (what `forward` computes)."""
    with torch.inference_mode(), _autocast(compute_dtype):
        logits = model(input_ids=torch.tensor([tokens]), use_cache=False).logits[0].float()
    lps = torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(tokens[1:]).unsqueeze(1)).squeeze(1)
    return lps.tolist()


def assert_logprobs_match(
    model: torch.nn.Module,
    prompt: list[int],
    seq: GeneratedSequence,
    atol: float,
    compute_dtype: torch.dtype = torch.float32,
) -> None:
    assert len(seq.logprobs) == len(seq.tokens)
    if not seq.tokens:
        return
    expected = reference_logprobs(model, prompt + seq.tokens, compute_dtype)[len(prompt) - 1 :]
    torch.testing.assert_close(torch.tensor(seq.logprobs), torch.tensor(expected), atol=atol, rtol=0)


@pytest.fixture
def forward_shapes(model: LlamaForCausalLM) -> Iterator[list[tuple[int, int]]]:
    """(batch, length) of every forward pass of the base model's embedding layer."""
    shapes: list[tuple[int, int]] = []
    handle = model.get_input_embeddings().register_forward_hook(
        lambda _m, args, _out: shapes.append(tuple(args[0].shape))  # type: ignore[arg-type]
    )
    yield shapes
    handle.remove()


# ----------------------------------------------------------------------------------------------------------
# Correctness


def test_greedy_batched_equals_unbatched_reference(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast
) -> None:
    prompts = _prompts(tokenizer)
    # Different budgets, so rows finish at different steps (the longest prompt first: its padding goes too).
    budgets = [12, 9, 15, 3, 7, 10]
    requests = [
        GenerationRequest(p, 1, _greedy(n, stop_token_ids=[])) for p, n in zip(prompts, budgets, strict=True)
    ]
    results = _run(model, requests, tokenizer)
    for prompt, n, result in zip(prompts, budgets, results, strict=True):
        (seq,) = result.sequences
        assert seq.tokens == reference_greedy(model, prompt, n)
        assert seq.stop_reason == "length"
        assert_logprobs_match(model, prompt, seq, atol=1e-4)
        assert result.prompt_logprobs is None


def test_sampled_logprobs_match_full_forward(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast
) -> None:
    prompts = _prompts(tokenizer)
    specs = [
        SamplingSpec(max_tokens=16, temperature=1.0, seed=1, stop_token_ids=[]),
        SamplingSpec(max_tokens=11, temperature=0.7, top_p=0.9, seed=2, stop_token_ids=[]),
        SamplingSpec(max_tokens=13, temperature=1.3, top_k=20, stop_token_ids=[]),
    ]
    requests = [GenerationRequest(p, 3, specs[i % 3]) for i, p in enumerate(prompts)]
    for request, result in zip(requests, _run(model, requests, tokenizer), strict=True):
        assert len(result.sequences) == 3
        for seq in result.sequences:
            assert len(seq.tokens) == request.spec.max_tokens
            assert_logprobs_match(model, request.prompt_tokens, seq, atol=1e-4)


def test_prompt_logprobs_match_full_forward(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompts = _prompts(tokenizer)
    long_prompt = [t for p in prompts for t in p] * 2
    requests = [
        GenerationRequest(prompts[1], 2, _greedy(4), prompt_logprobs=True),
        GenerationRequest(prompts[1], 1, _greedy(4)),  # same prompt, no prompt logprobs
        GenerationRequest(long_prompt, 1, _greedy(1), prompt_logprobs=True),
        # compute_logprobs-style, no samples
        GenerationRequest(prompts[3], 0, _greedy(1), prompt_logprobs=True),
        GenerationRequest(prompts[5], 1, _greedy(1), prompt_logprobs=True),  # a one-token prompt
    ]
    for chunk in (512, 7):  # 7: chunked prefill
        monkeypatch.setattr(sampling_model, "PREFILL_CHUNK_TOKENS", chunk)
        results = _run(model, requests, tokenizer)
        for request, result in zip(requests, results, strict=True):
            if not request.prompt_logprobs:
                assert result.prompt_logprobs is None
                continue
            lps = result.prompt_logprobs
            assert lps is not None and len(lps) == len(request.prompt_tokens)
            assert math.isnan(lps[0])
            expected = reference_logprobs(model, request.prompt_tokens)
            torch.testing.assert_close(torch.tensor(lps[1:]), torch.tensor(expected), atol=1e-4, rtol=0)
            assert len(result.sequences) == request.num_samples
        assert results[0].sequences[0].tokens == results[1].sequences[0].tokens


def test_bf16_logprobs_match_full_forward(tokenizer: PreTrainedTokenizerFast) -> None:
    model = _tiny_llama(len(tokenizer)).to(torch.bfloat16)
    prompts = _prompts(tokenizer)
    requests = [
        GenerationRequest(p, 2, SamplingSpec(max_tokens=10, seed=i, stop_token_ids=[]), prompt_logprobs=True)
        for i, p in enumerate(prompts)
    ]
    results = _run(model, requests, tokenizer, compute_dtype=torch.bfloat16)
    for request, result in zip(requests, results, strict=True):
        for seq in result.sequences:
            assert len(seq.tokens) == 10
            assert_logprobs_match(model, request.prompt_tokens, seq, atol=0.05, compute_dtype=torch.bfloat16)
        expected = reference_logprobs(model, request.prompt_tokens, torch.bfloat16)
        assert result.prompt_logprobs is not None
        torch.testing.assert_close(
            torch.tensor(result.prompt_logprobs[1:]), torch.tensor(expected), atol=0.05, rtol=0
        )


# ----------------------------------------------------------------------------------------------------------
# Seeds and sampling parameters


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_seed_reproducible_whatever_the_batch(
    tokenizer: PreTrainedTokenizerFast, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    # both top-k/top-p paths, as with a real vocabulary
    monkeypatch.setattr(sampling_tokens, "FILTER_CANDIDATES", 16)
    model = _tiny_llama(len(tokenizer)).to(dtype)
    prompts = _prompts(tokenizer)
    targets = [
        GenerationRequest(
            prompts[2], 3, SamplingSpec(max_tokens=20, temperature=0.9, top_p=0.95, top_k=40, seed=12)
        ),
        # a lone row
        GenerationRequest(prompts[0], 1, SamplingSpec(max_tokens=24, seed=77, stop_token_ids=[])),
        GenerationRequest(prompts[1], 2, SamplingSpec(max_tokens=16, temperature=0.5, top_p=0.8, seed=5)),
    ]
    alone = [_run(model, [t], tokenizer, compute_dtype=dtype)[0] for t in targets]
    companions = [
        GenerationRequest(prompts[0], 2, SamplingSpec(max_tokens=5)),
        GenerationRequest(prompts[3], 1, _greedy(30)),
        GenerationRequest(prompts[4], 4, SamplingSpec(max_tokens=25, temperature=1.5, top_k=3, seed=7)),
    ]
    mixed = _run(
        model,
        [companions[0], targets[0], companions[1], targets[2], companions[2], targets[1]],
        tokenizer,
        compute_dtype=dtype,
    )
    split = _run(model, [*companions, *targets], tokenizer, compute_dtype=dtype, max_batch_tokens=64)
    for other in ([mixed[1], mixed[5], mixed[3]], split[3:]):
        for got, want in zip(other, alone, strict=True):
            assert [s.tokens for s in got.sequences] == [s.tokens for s in want.sequences]
            for got_seq, want_seq in zip(got.sequences, want.sequences, strict=True):
                if dtype == torch.bfloat16:
                    # oneDNN's bf16 matmuls give each row the same bits whatever the batch (with >= 2 rows)...
                    assert got_seq.logprobs == want_seq.logprobs
                else:
                    # ...MKL's fp32 ones do not (rounding-level differences only).
                    assert got_seq.logprobs == pytest.approx(want_seq.logprobs, abs=1e-5)
    # The samples of one request are distinct streams, and another seed gives other samples.
    assert len({tuple(s.tokens) for s in alone[0].sequences}) > 1
    reseeded = GenerationRequest(prompts[2], 3, SamplingSpec(max_tokens=20, temperature=0.9, seed=99))
    assert (
        _run(model, [reseeded], tokenizer, compute_dtype=dtype)[0].sequences[0].tokens
        != alone[0].sequences[0].tokens
    )


def test_unseeded_samples_differ(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    request = GenerationRequest(_prompts(tokenizer)[0], 1, SamplingSpec(max_tokens=20, stop_token_ids=[]))
    first = _run(model, [request], tokenizer)[0].sequences[0].tokens
    second = _run(model, [request], tokenizer)[0].sequences[0].tokens
    assert first != second


def test_top_k_one_and_tiny_top_p_are_greedy(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast
) -> None:
    prompt = _prompts(tokenizer)[1]
    greedy = reference_greedy(model, prompt, 12)
    requests = [
        GenerationRequest(
            prompt, 2, SamplingSpec(max_tokens=12, temperature=1.5, top_k=1, stop_token_ids=[])
        ),
        GenerationRequest(
            prompt, 2, SamplingSpec(max_tokens=12, temperature=1.5, top_p=1e-6, stop_token_ids=[])
        ),
    ]
    for result in _run(model, requests, tokenizer):
        assert all(seq.tokens == greedy for seq in result.sequences)


@pytest.mark.parametrize("candidates", [8, 256])
def test_sampling_distribution_follows_temperature_top_k_top_p(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    monkeypatch: pytest.MonkeyPatch,
    candidates: int,
) -> None:
    # 8 candidates: top-k <= 8 and short nuclei take the candidate path, the rest the full sort.
    monkeypatch.setattr(sampling_tokens, "FILTER_CANDIDATES", candidates)
    prompt = _prompts(tokenizer)[0]
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1].float()
    n = 10_000
    cases = [(0.5, -1, 1.0), (1.0, 5, 1.0), (1.2, -1, 0.6), (0.3, -1, 0.8), (0.8, 12, 0.7)]
    requests = [
        GenerationRequest(prompt, n, SamplingSpec(max_tokens=1, temperature=t, top_k=k, top_p=p, seed=5))
        for t, k, p in cases
    ]

    def chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
        expected = probs * n
        return float(((counts - expected) ** 2 / expected.clamp_min(1e-9)).sum())

    for (temperature, top_k, top_p), result in zip(cases, _run(model, requests, tokenizer), strict=True):
        probs = torch.softmax(logits / temperature, dim=-1)
        order = probs.argsort(descending=True)
        if top_k > 0:  # top-k first, renormalized; then the nucleus of what is left (as HF and vLLM do)
            probs = torch.zeros_like(probs).index_copy(0, order[:top_k], probs[order[:top_k]])
            probs /= probs.sum()
        keep = torch.zeros_like(probs, dtype=torch.bool)
        cumulative = 0.0
        for rank, token in enumerate(order.tolist()):
            if (top_k > 0 and rank >= top_k) or cumulative >= top_p:
                break
            keep[token] = True
            cumulative += float(probs[token])
        expected = torch.where(keep, probs, 0.0)
        expected /= expected.sum()
        counts = torch.bincount(torch.tensor([s.tokens[0] for s in result.sequences]), minlength=len(probs))
        assert not bool((counts[~keep] > 0).any()), "sampled a token outside top-k / top-p"
        print(f"T={temperature} top_k={top_k} top_p={top_p}: {int(keep.sum())} tokens kept")
        dof = int(keep.sum()) - 1
        statistic = chi2(counts[keep].double(), expected[keep].double())
        assert statistic <= dof + 6 * math.sqrt(2 * max(dof, 1)), (statistic, dof)
        # The test has power: the untempered distribution is clearly rejected.
        untempered = torch.where(keep, torch.softmax(logits, dim=-1), 0.0)
        untempered /= untempered.sum()
        if temperature != 1.0:
            assert chi2(counts[keep].double(), untempered[keep].double()) > dof + 6 * math.sqrt(2 * dof)


# ----------------------------------------------------------------------------------------------------------
# Stops and lengths


def test_stop_token_is_kept_and_eos_is_the_default(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast
) -> None:
    prompt = _prompts(tokenizer)[1]
    greedy = reference_greedy(model, prompt, 20)
    stop = greedy[4]
    cut = greedy.index(stop) + 1
    explicit = GenerationRequest(prompt, 1, _greedy(20, stop_token_ids=[stop, 10_000]))
    as_eos = GenerationRequest(prompt, 1, _greedy(20))  # None -> eos_token_ids
    no_stop = GenerationRequest(prompt, 1, _greedy(20, stop_token_ids=[]))  # [] -> not even EOS
    results = generate(
        model, [explicit, as_eos, no_stop], Decoding([stop], torch.float32, MAX_CONTEXT, tokenizer)
    )
    for result in results[:2]:
        (seq,) = result.sequences
        assert seq.tokens == greedy[:cut]
        assert seq.tokens[-1] == stop
        assert seq.stop_reason == "stop"
        assert len(seq.logprobs) == cut
    (seq,) = results[2].sequences
    assert seq.tokens == greedy and stop in seq.tokens
    assert seq.stop_reason == "length"


def test_stop_string_is_kept(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    prompt = _prompts(tokenizer)[2]
    greedy = reference_greedy(model, prompt, 30)
    text = tokenizer.decode(greedy)
    stop_string = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop_string
    cut = next(k for k in range(1, 31) if stop_string in tokenizer.decode(greedy[:k]))
    requests = [
        GenerationRequest(prompt, 1, _greedy(30, stop_strings=["never-generated-\u00e9", stop_string])),
        # Stop strings alone (no EOS): a stop string still ends the sequence.
        GenerationRequest(prompt, 1, _greedy(30, stop_token_ids=[], stop_strings=[stop_string])),
        GenerationRequest(prompt, 1, _greedy(30, stop_strings=["never-generated-\u00e9"])),
    ]
    results = _run(model, requests, tokenizer)
    for result in results[:2]:
        (seq,) = result.sequences
        assert seq.tokens == greedy[:cut]
        assert stop_string in tokenizer.decode(seq.tokens)
        assert stop_string not in tokenizer.decode(seq.tokens[:-1])
        assert seq.stop_reason == "stop"
    assert results[2].sequences[0].tokens == greedy
    assert results[2].sequences[0].stop_reason == "length"


def test_stop_string_is_searched_in_the_completion_only(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast
) -> None:
    prompt = tokenizer.encode("User: what is 2+2?\n\nAssistant:")
    request = GenerationRequest(prompt, 1, _greedy(8, stop_token_ids=[], stop_strings=["Assistant:"]))
    (seq,) = _run(model, [request], tokenizer)[0].sequences
    assert seq.tokens == reference_greedy(model, prompt, 8)[: len(seq.tokens)]
    assert ("Assistant:" in tokenizer.decode(seq.tokens)) == (seq.stop_reason == "stop")


def test_stop_string_matcher_waits_for_complete_characters(tokenizer: PreTrainedTokenizerFast) -> None:
    """Incremental detokenization: a stop string is found at the token that completes it, never earlier."""
    text = "the caf\u00e9 na\u00efve \u65e5\u672c \u00fcber world"
    tokens = tokenizer.encode(text)
    assert tokenizer.decode(tokens) == text
    # partial characters occur
    assert any("\ufffd" in tokenizer.decode(tokens[:k]) for k in range(len(tokens)))
    prompt = tokenizer.encode("hello")
    for stop in ["\u00e9", "\u65e5", "\u672c \u00fc", "na", "r w", "world"]:
        matcher = StopStringMatcher(tokenizer, prompt, ["never", stop])
        found = next(k for k, token in enumerate(tokens) if matcher.push(token))
        expected = next(k for k in range(len(tokens)) if stop in tokenizer.decode(tokens[: k + 1]))
        assert found == expected, stop


def test_lengths_and_context_limit(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    prompt = _prompts(tokenizer)[3]
    requests = [
        GenerationRequest(prompt, 2, SamplingSpec(max_tokens=5, stop_token_ids=[])),
        GenerationRequest(prompt, 1, SamplingSpec(max_tokens=0)),
        GenerationRequest(prompt, 1, _greedy(None, stop_token_ids=[])),  # until the context limit
    ]
    results = _run(model, requests, tokenizer, max_context=len(prompt) + 7)
    assert [len(s.tokens) for s in results[0].sequences] == [5, 5]
    assert all(s.stop_reason == "length" for s in results[0].sequences)
    assert results[1].sequences == [GeneratedSequence(tokens=[], logprobs=[], stop_reason="length")]
    (seq,) = results[2].sequences
    assert seq.tokens == reference_greedy(model, prompt, 7)
    assert seq.stop_reason == "length"
    # A prompt that fills the context gets no tokens, but still its prompt logprobs.
    full = GenerationRequest(prompt, 1, _greedy(4), prompt_logprobs=True)
    (result,) = _run(model, [full], tokenizer, max_context=len(prompt))
    assert result.sequences[0].tokens == [] and result.sequences[0].stop_reason == "length"
    assert result.prompt_logprobs is not None and len(result.prompt_logprobs) == len(prompt)


def test_num_samples(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    request = GenerationRequest(_prompts(tokenizer)[0], 4, SamplingSpec(max_tokens=12, seed=3))
    (result,) = _run(model, [request], tokenizer)
    assert len(result.sequences) == 4
    assert all(1 <= len(s.tokens) <= 12 and len(s.logprobs) == len(s.tokens) for s in result.sequences)
    assert len({tuple(s.tokens) for s in result.sequences}) > 1


def test_invalid_requests(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    spec = SamplingSpec(max_tokens=3)
    with pytest.raises(ValueError, match="empty"):
        _run(model, [GenerationRequest([], 1, spec)], tokenizer)
    with pytest.raises(ValueError, match="context"):
        _run(model, [GenerationRequest([1] * 10, 1, spec)], tokenizer, max_context=8)
    with pytest.raises(ValueError, match="vocabulary"):
        _run(model, [GenerationRequest([1, len(tokenizer)], 1, spec)], tokenizer)
    with pytest.raises(ValueError, match="top_p"):
        _run(model, [GenerationRequest([1], 1, SamplingSpec(max_tokens=3, top_p=0.0))], tokenizer)
    with pytest.raises(ValueError, match="tokenizer"):
        generate(
            model,
            [GenerationRequest([1], 1, SamplingSpec(max_tokens=3, stop_strings=["x"]))],
            Decoding([0], torch.float32, MAX_CONTEXT, tokenizer=None),
        )


# ----------------------------------------------------------------------------------------------------------
# Batching mechanics


def test_prefill_once_batched_decode_and_finished_rows_dropped(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, forward_shapes: list[tuple[int, int]]
) -> None:
    prompts = _prompts(tokenizer)
    requests = [
        GenerationRequest(prompts[1], 4, SamplingSpec(max_tokens=3, stop_token_ids=[])),
        GenerationRequest(prompts[3], 2, SamplingSpec(max_tokens=8, stop_token_ids=[])),
        GenerationRequest(prompts[1], 1, _greedy(5, stop_token_ids=[])),  # same prompt as the first request
    ]
    assert min(len(prompts[1]), len(prompts[3])) > 1
    _run(model, requests, tokenizer)
    prefill = [s for s in forward_shapes if s[1] > 1]
    decode = [s for s in forward_shapes if s[1] == 1]
    # Two unique prompts, each prefilled once.
    assert sorted(prefill) == sorted([(1, len(prompts[1])), (1, len(prompts[3]))])
    # One batched pass per step: 7 rows, then 3 after step 3, then 2 after step 5; step 8 needs no pass.
    assert [b for b, _ in decode] == [7, 7, 3, 3, 2, 2, 2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_requests_join_a_running_batch_with_the_same_samples(
    tokenizer: PreTrainedTokenizerFast, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Continuous batching: a request added while others decode joins at the next step, is answered when its
    own samples are done, and samples exactly what it samples alone (seeded)."""
    monkeypatch.setattr(sampling_tokens, "FILTER_CANDIDATES", 16)
    model = _tiny_llama(len(tokenizer)).to(dtype)
    shapes: list[tuple[int, int]] = []
    prompts = _prompts(tokenizer)
    requests = [
        GenerationRequest(prompts[1], 2, SamplingSpec(max_tokens=30, seed=3, stop_token_ids=[])),
        GenerationRequest(prompts[0], 1, SamplingSpec(max_tokens=6, temperature=0.7, top_p=0.9, seed=4)),
        GenerationRequest(prompts[3], 3, SamplingSpec(max_tokens=12, top_k=5, seed=5, stop_token_ids=[])),
        GenerationRequest(prompts[4], 1, _greedy(8, stop_token_ids=[])),
    ]
    alone = [_run(model, [r], tokenizer, compute_dtype=dtype)[0] for r in requests]
    handle = model.get_input_embeddings().register_forward_hook(
        lambda _m, args, _out: shapes.append(tuple(args[0].shape))  # type: ignore[arg-type]
    )
    loop = sampling.DecodeLoop(model, Decoding([tokenizer.eos_token_id], dtype, MAX_CONTEXT, tokenizer))
    loop.add("a", requests[0])
    done: dict[object, GenerationResult] = {}
    arrivals = {2: ("b", requests[1]), 5: ("c", requests[2]), 9: ("d", requests[3])}
    step = 0
    while not loop.idle or arrivals:
        if step in arrivals:
            loop.add(*arrivals.pop(step))
        finished = loop.step()
        for key in finished:
            assert key not in done
        done.update(finished)
        step += 1
        if step == 9:  # b (6 tokens from step 2) is answered while a (30 tokens) still decodes
            assert "b" in done and "a" not in done
    handle.remove()
    for key, want in zip("abcd", alone, strict=True):
        got = done[key]
        assert [s.tokens for s in got.sequences] == [s.tokens for s in want.sequences]
        for got_seq, want_seq in zip(got.sequences, want.sequences, strict=True):
            assert got_seq.logprobs == pytest.approx(
                want_seq.logprobs, abs=1e-5 if dtype == torch.float32 else 0
            )
    decode_rows = [b for b, t in shapes if t == 1]
    assert max(decode_rows) >= 5  # a, then c (3 rows) and d joined the running batch
    assert len(decode_rows) < 30 + 6 + 12 + 8  # fewer passes than one request at a time


def test_one_token_requests_are_answered_from_the_prefill_without_joining_the_batch(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast
) -> None:
    """compute_logprobs asks for one token: it never needs the decode cache, so it never joins a batch."""
    prompts = _prompts(tokenizer)
    decoding = GenerationRequest(prompts[1], 2, SamplingSpec(max_tokens=20, seed=3, stop_token_ids=[]))
    scoring = [
        GenerationRequest(prompts[i], 1, SamplingSpec(max_tokens=1, seed=i), prompt_logprobs=True)
        for i in (0, 3)
    ]
    alone = [_run(model, [r], tokenizer)[0] for r in scoring]
    loop = sampling.DecodeLoop(
        model, Decoding([tokenizer.eos_token_id], torch.float32, MAX_CONTEXT, tokenizer)
    )
    loop.add("decoding", decoding)
    loop.step()
    assert loop.running_rows == 2
    for i, request in enumerate(scoring):
        loop.add(i, request)
    done = loop.step()  # admitted and answered in the same step; the batch still holds only its 2 rows
    assert sorted(done, key=str) == [0, 1] and loop.running_rows == 2
    for i, want in enumerate(alone):
        assert [s.tokens for s in done[i].sequences] == [s.tokens for s in want.sequences]
        assert done[i].sequences[0].logprobs == pytest.approx(want.sequences[0].logprobs, abs=1e-6)
        assert done[i].prompt_logprobs == pytest.approx(want.prompt_logprobs, abs=1e-6, nan_ok=True)


def test_long_generation_grows_the_cache(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    prompts = _prompts(tokenizer)
    requests = [
        GenerationRequest(prompts[3], 1, _greedy(300, stop_token_ids=[])),
        GenerationRequest(prompts[0], 2, SamplingSpec(max_tokens=170, seed=4, stop_token_ids=[])),
    ]
    results = _run(model, requests, tokenizer)
    (seq,) = results[0].sequences
    assert seq.tokens == reference_greedy(model, prompts[3], 300)
    assert_logprobs_match(model, prompts[3], seq, atol=1e-4)
    for sampled in results[1].sequences:
        assert len(sampled.tokens) == 170
        assert_logprobs_match(model, prompts[0], sampled, atol=1e-4)


def test_max_batch_tokens_splits_without_changing_results(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, forward_shapes: list[tuple[int, int]]
) -> None:
    prompts = _prompts(tokenizer)
    requests = [
        GenerationRequest(p, 3, SamplingSpec(max_tokens=6 + i, seed=i, stop_token_ids=[]))
        for i, p in enumerate(prompts)
    ]
    whole = _run(model, requests, tokenizer)
    assert max(b for b, _ in forward_shapes) == 18
    forward_shapes.clear()
    split = _run(model, requests, tokenizer, max_batch_tokens=40)
    assert max(b for b, _ in forward_shapes) < 18
    for a, b in zip(whole, split, strict=True):
        assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]


def test_peft_lora_model(
    model: LlamaForCausalLM, lora_model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast
) -> None:
    prompts = _prompts(tokenizer)
    requests = [
        GenerationRequest(p, 1, _greedy(10, stop_token_ids=[]), prompt_logprobs=True) for p in prompts
    ]
    lora_model.train()  # sampling must not run with dropout, and must give the mode back
    results = _run(lora_model, requests, tokenizer)
    assert lora_model.training
    lora_model.eval()
    base = _run(model, requests, tokenizer)
    differs = False
    for prompt, result, base_result in zip(prompts, results, base, strict=True):
        (seq,) = result.sequences
        assert seq.tokens == reference_greedy(lora_model, prompt, 10)
        assert_logprobs_match(lora_model, prompt, seq, atol=1e-4)
        assert result.prompt_logprobs is not None
        expected = reference_logprobs(lora_model, prompt)
        torch.testing.assert_close(
            torch.tensor(result.prompt_logprobs[1:]), torch.tensor(expected), atol=1e-4, rtol=0
        )
        differs |= seq.logprobs != pytest.approx(base_result.sequences[0].logprobs, abs=1e-3)
    assert differs, "the LoRA adapter should change the outputs"


def test_peft_lora_on_bf16_base(tokenizer: PreTrainedTokenizerFast) -> None:
    from peft import LoraConfig, get_peft_model

    base = _tiny_llama(len(tokenizer), seed=2).to(torch.bfloat16)
    torch.manual_seed(3)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    lora = get_peft_model(base, config).eval()
    assert any(p.dtype == torch.float32 for n, p in lora.named_parameters() if "lora_" in n)
    prompts = _prompts(tokenizer)
    requests = [GenerationRequest(p, 2, SamplingSpec(max_tokens=8, seed=i)) for i, p in enumerate(prompts)]
    for request, result in zip(
        requests, _run(lora, requests, tokenizer, compute_dtype=torch.bfloat16), strict=True
    ):
        for seq in result.sequences:
            assert_logprobs_match(lora, request.prompt_tokens, seq, atol=0.05, compute_dtype=torch.bfloat16)


def test_timing_batched_vs_sequential(tokenizer: PreTrainedTokenizerFast) -> None:
    """Not a pass/fail check: prints how much one batched call saves over 16 one-by-one calls."""
    model = _tiny_llama(len(tokenizer))
    words = " ".join(_CORPUS).split()
    prompts = [tokenizer.encode(" ".join(words[i : i + 3 + i % 5])) for i in range(16)]
    requests = [
        GenerationRequest(p, 1, SamplingSpec(max_tokens=48, seed=i, stop_token_ids=[]))
        for i, p in enumerate(prompts)
    ]
    _run(model, requests[:2], tokenizer)  # warm-up
    start = time.perf_counter()
    batched = _run(model, requests, tokenizer)
    batched_s = time.perf_counter() - start
    start = time.perf_counter()
    sequential = [_run(model, [r], tokenizer)[0] for r in requests]
    sequential_s = time.perf_counter() - start
    assert [r.sequences[0].tokens for r in batched] == [r.sequences[0].tokens for r in sequential]
    print(
        f"\n16 prompts x 48 tokens: batched {batched_s:.3f}s, one by one {sequential_s:.3f}s "
        f"-> {sequential_s / batched_s:.1f}x"
    )


# ----------------------------------------------------------------------------------------------------------
# The transformers cache API under the ragged decode cache

_CACHE_API_CHANGED = (
    "transformers changed the cache API that posttrain.engine.sampling builds its ragged decode cache on: "
    "RaggedLayer (engine/sampling/cache.py) subclasses the internal transformers.cache_utils.DynamicLayer, "
    "and ragged_cache installs its layers in a DynamicCache, which is only known to work behind the "
    "transformers<=5.5.4 pin in pyproject.toml. Re-check RaggedLayer, ragged_cache and prefill against "
    "transformers.cache_utils before moving the pin. What changed:\n  - "
)


def _parameters(fn: Callable[..., object]) -> list[str]:
    stars = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}
    return [stars.get(p.kind, "") + p.name for p in inspect.signature(fn).parameters.values()]


def _two_row_ragged_cache() -> tuple[DynamicCache, ragged.RaggedState, torch.Tensor]:
    """A ragged cache over two prompts of 3 and 5 tokens (one layer), set up for the next decode step."""
    lengths = torch.tensor([3, 5])
    prefills = [
        Prefill(
            keys=[torch.randn(1, 2, n, 4)],
            values=[torch.randn(1, 2, n, 4)],
            next_logits=torch.zeros(3),
            prompt_logprobs=None,
        )
        for n in (3, 5)
    ]
    cache, state = ragged.ragged_cache(prefills, torch.tensor([0, 1]), lengths, 4, 128)
    state.width = round_up(int(lengths.max()) + 1, ragged.KEY_ALIGN)
    return cache, state, lengths


def test_the_transformers_cache_api_under_the_ragged_cache_is_unchanged() -> None:
    problems: list[str] = []

    def check(what: str, ok: Callable[[], object]) -> None:
        try:
            if ok():
                return
            problems.append(what)
        except Exception as exc:  # noqa: BLE001 - every failure is reported with what it broke
            problems.append(f"{what} (raised {type(exc).__name__}: {exc})")

    # What RaggedLayer overrides, calls or inherits from its base class, as it was written against.
    check("DynamicLayer is a CacheLayerMixin", lambda: issubclass(DynamicLayer, CacheLayerMixin))
    check(
        "CacheLayerMixin.__init__() takes no arguments",
        lambda: _parameters(CacheLayerMixin.__init__) == ["self"],
    )
    check(
        "CacheLayerMixin.__init__ sets keys, values and is_initialized",
        lambda: (
            (fresh := DynamicLayer()).keys is None and fresh.values is None and fresh.is_initialized is False
        ),
    )
    for method, params in {
        "update": ["self", "key_states", "value_states", "*args", "**kwargs"],
        "get_seq_length": ["self"],
        "get_mask_sizes": ["self", "query_length"],
        "batch_select_indices": ["self", "indices"],
    }.items():
        actual = _parameters(getattr(DynamicLayer, method)) if hasattr(DynamicLayer, method) else "nothing"
        check(f"DynamicLayer.{method} took {params}, now {actual}", lambda a=actual, p=params: a == p)
    check(
        "RaggedLayer leaves no abstract method unimplemented",
        lambda: not ragged.RaggedLayer.__abstractmethods__,
    )
    check("DynamicLayer.is_sliding is False", lambda: DynamicLayer.is_sliding is False)
    check(
        "DynamicCache() starts with no layers and replicates DynamicLayer",
        lambda: DynamicCache().layers == [] and DynamicCache().layer_class_to_replicate is DynamicLayer,
    )

    # How the model drives a DynamicCache of ragged layers: sequence length, mask sizes, update.
    try:
        cache, state, lengths = _two_row_ragged_cache()
    except Exception as exc:  # noqa: BLE001
        problems.append(f"_ragged_cache could not build a DynamicCache of _RaggedLayer layers ({exc!r})")
    else:
        check("DynamicCache.get_seq_length() asks layer 0", lambda: cache.get_seq_length() == state.width - 1)
        check(
            "DynamicCache.get_mask_sizes(query_length, layer_idx) asks the layer, whose key width comes from "
            "get_seq_length()",
            lambda: cache.get_mask_sizes(1, 0) == (state.width, 0),
        )
        check("DynamicCache.is_sliding asks the layers", lambda: cache.is_sliding == [False])
        new_keys, new_values = torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4)
        try:
            keys, values = cache.update(new_keys, new_values, 0)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"DynamicCache.update(keys, values, layer_idx) failed ({exc!r})")
        else:
            check(
                "DynamicCache.update returns the layer's keys, as wide as the step",
                lambda: keys.shape[2] == state.width,
            )
            check(
                "DynamicCache.update runs the layer's update: each row's key and value land at that row's length",
                lambda: all(
                    torch.equal(keys[row, :, int(lengths[row])], new_keys[row, :, 0])
                    and torch.equal(values[row, :, int(lengths[row])], new_values[row, :, 0])
                    for row in range(2)
                ),
            )
        check(
            "DynamicCache with layer_class_to_replicate=None adds no layers of its own",
            lambda: len(cache.layers) == 1 and isinstance(cache.layers[0], ragged.RaggedLayer),
        )

    assert not problems, _CACHE_API_CHANGED + "\n  - ".join(problems)
