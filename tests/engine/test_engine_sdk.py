"""The local engine driven by the unmodified tinker SDK over loopback, on a tiny random Llama (fp32).

Everything goes through `tinker.ServiceClient(base_url=...)` as a user's script would; a few tests also speak
raw HTTP where the SDK hides what is being checked (retries with the same seq_id, the API key header).
"""

from __future__ import annotations

import math
import os
import re
import time

import httpx
import numpy as np
import pytest
import tinker
import torch
from conftest import finish
from tinker import types
from tinker.proto import request_conv, response_conv

PROMPT = [1, 504, 3458, 314, 260, 1345, 30, 198, 504, 3458]  # a fixed token sequence inside the vocabulary


def _datum(tokens: list[int], weights: list[float] | None = None) -> types.Datum:
    """Next-token prediction over `tokens`: input tokens[:-1], targets tokens[1:]."""
    n = len(tokens) - 1
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": tokens[1:],
            "weights": weights if weights is not None else [1.0] * n,
        },
    )


def _batch(seed: int, n: int = 3, length: int = 12) -> list[types.Datum]:
    g = torch.Generator().manual_seed(seed)
    return [_datum(torch.randint(100, 40000, (length + i,), generator=g).tolist()) for i in range(n)]


def _step(
    tc: tinker.TrainingClient, data: list[types.Datum], lr: float = 1e-2
) -> types.ForwardBackwardOutput:
    fb = tc.forward_backward(data, "cross_entropy")
    opt = tc.optim_step(types.AdamParams(learning_rate=lr))
    out = fb.result()
    opt.result()
    return out


def _logprobs(out: types.ForwardBackwardOutput) -> list[np.ndarray]:
    return [o["logprobs"].to_numpy() for o in out.loss_fn_outputs]


def _probe(tc: tinker.TrainingClient) -> np.ndarray:
    return np.concatenate(_logprobs(tc.forward([_datum(PROMPT)], "cross_entropy").result()))


def _session_id(service: tinker.ServiceClient) -> str:
    return service.holder.get_session_id()


@pytest.fixture(scope="module")
def reference(tiny_model: str):
    """The same tiny model loaded in this process: what the engine's numbers must match."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    return model.eval()


def _reference_logprobs(model, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokens[:-1]])).logits[0].float()
    lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0]
    return lp.numpy()


# ----------------------------------------------------------------------------------------------------------
# Training numerics


def test_forward_logprobs_match_a_reference_forward_pass(service, tiny_model, reference):
    tc = service.create_lora_training_client(base_model=tiny_model, rank=4, seed=0).result()
    assert re.fullmatch(re.escape(_session_id(service)) + r":train:\d+", tc.model_id)
    # LoRA B starts at zero: the adapter model is the base model. Two lengths: padding must not leak in.
    long, short = PROMPT + [2100, 42, 7], PROMPT[:5]
    weights = [0.5] * (len(long) - 1)
    out = tc.forward([_datum(long, weights), _datum(short)], "cross_entropy").result()
    got_long, got_short = _logprobs(out)
    np.testing.assert_allclose(got_long, _reference_logprobs(reference, long), atol=1e-4)
    np.testing.assert_allclose(got_short, _reference_logprobs(reference, short), atol=1e-4)
    expected_loss = -(got_long * 0.5).sum() - got_short.sum()
    assert out.metrics["loss:sum"] == pytest.approx(expected_loss, rel=1e-5)
    np.testing.assert_allclose(
        out.loss_fn_outputs[0]["elementwise_loss"].to_numpy(), -0.5 * got_long, rtol=1e-6
    )
    # The SDK's tokenizer for this run resolves offline (get_info carries the local tokenizer path).
    assert tc.get_tokenizer().encode("hello world") == reference_tokenizer(tiny_model).encode("hello world")


def reference_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


RL_CASES = [
    ("importance_sampling", {}),
    ("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}),
    ("cispo", {"clip_low_threshold": 0.0, "clip_high_threshold": 1.05}),
    ("dro", {"beta": 0.2}),
    ("gspo", {"clip_low_threshold": 0.95, "clip_high_threshold": 1.02}),
]
GSPO_MASK_FROM = 4  # the gspo datums' sequence_ratio_mask covers the tokens from here on


def _rl_expected(name: str, config: dict, lp: np.ndarray, q: np.ndarray, adv: np.ndarray) -> np.ndarray:
    ratio = np.exp(lp - q)
    if name == "importance_sampling":
        return -ratio * adv
    if name in ("ppo", "gspo"):
        # GSPO-token: every token's ratio is the sequence's, exp(mean log-ratio over the mask)
        if name == "gspo":
            ratio = np.full_like(lp, np.exp(np.mean((lp - q)[GSPO_MASK_FROM:])))
        clipped = np.clip(ratio, config["clip_low_threshold"], config["clip_high_threshold"])
        return -np.minimum(ratio * adv, clipped * adv)
    if name == "cispo":
        return -np.clip(ratio, config["clip_low_threshold"], config["clip_high_threshold"]) * lp * adv
    return -(lp * adv - 0.5 * config["beta"] * (lp - q) ** 2)


def test_rl_losses_are_summed_per_token_terms_and_train(service, tiny_model):
    tc = service.create_lora_training_client(base_model=tiny_model, rank=4, seed=1).result()
    tokens = PROMPT + [2100, 42, 7, 99]
    n = len(tokens) - 1
    rng = np.random.default_rng(0)
    base_lp = _logprobs(tc.forward([_datum(tokens)], "cross_entropy").result())[0]
    q = (base_lp + rng.normal(0, 0.2, n)).astype(np.float32)  # "sampler" logprobs near the learner's
    adv = rng.normal(0, 1, n).astype(np.float32)

    mask = (np.arange(n) >= GSPO_MASK_FROM).astype(np.float32)

    def rl_datum(advantages: np.ndarray, name: str = "") -> types.Datum:
        inputs = {"target_tokens": tokens[1:], "logprobs": q, "advantages": advantages}
        if name == "gspo":
            inputs["sequence_ratio_mask"] = mask
        return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=inputs)

    for name, config in RL_CASES:
        out = tc.forward([rl_datum(adv, name), rl_datum(-adv, name)], name, config).result()
        total = 0.0
        for output, a in zip(out.loss_fn_outputs, (adv, -adv), strict=True):
            lp = output["logprobs"].to_numpy()
            np.testing.assert_allclose(lp, base_lp, atol=1e-5)
            expected = _rl_expected(name, config, lp, q, a)
            np.testing.assert_allclose(output["elementwise_loss"].to_numpy(), expected, rtol=1e-4, atol=1e-6)
            total += float(expected.sum())
        assert out.metrics["loss:sum"] == pytest.approx(total, rel=1e-4, abs=1e-5), name

    # Gradients flow through the RL losses: a positive advantage on every token raises their logprobs.
    for name, config in RL_CASES:
        before = _logprobs(tc.forward([_datum(tokens)], "cross_entropy").result())[0]
        tc.forward_backward([rl_datum(np.ones(n, np.float32), name)], name, config).result()
        tc.optim_step(types.AdamParams(learning_rate=5e-3)).result()
        after = _logprobs(tc.forward([_datum(tokens)], "cross_entropy").result())[0]
        assert after.sum() > before.sum() + 0.05, name


def test_top_k_targets_2d_dense_sparse_and_mixed_with_1d(service, tiny_model):
    tc = service.create_lora_training_client(base_model=tiny_model, rank=4, seed=2).result()
    inputs = PROMPT[:-1]
    n = len(inputs)
    g = torch.Generator().manual_seed(3)
    dense_targets = torch.randint(100, 40000, (n, 2), generator=g)  # full: sent dense
    dense_weights = torch.rand(n, 2, generator=g)
    sparse_targets = torch.zeros(n, 8, dtype=torch.long)  # mostly zeros: the SDK sends it as sparse CSR
    sparse_targets[:, 0] = torch.tensor(PROMPT[1:])
    sparse_targets[2, 3] = 777
    sparse_weights = torch.zeros(n, 8)
    sparse_weights[:, 0] = 1.0
    sparse_weights[2, 3] = 0.25
    sparse = types.Datum(
        model_input=types.ModelInput.from_ints(inputs),
        loss_fn_inputs={"target_tokens": sparse_targets, "weights": sparse_weights},
    )
    assert sparse.loss_fn_inputs["target_tokens"].sparse_crow_indices is not None
    dense = types.Datum(
        model_input=types.ModelInput.from_ints(inputs),
        loss_fn_inputs={"target_tokens": dense_targets, "weights": dense_weights},
    )
    # One request mixing [N], [N, 2] and [N, 8] targets: shapes come back per datum.
    out = tc.forward([_datum(PROMPT), dense, sparse], "cross_entropy").result()
    one_d, two, eight = _logprobs(out)
    assert one_d.shape == (n,) and two.shape == (n, 2) and eight.shape == (n, 8)

    # Each column is the logprob of that column's token at that position: compare with 1-D requests.
    def column_logprobs(column: torch.Tensor) -> np.ndarray:
        datum = types.Datum(
            model_input=types.ModelInput.from_ints(inputs), loss_fn_inputs={"target_tokens": column.tolist()}
        )
        return _logprobs(tc.forward([datum], "cross_entropy").result())[0]

    np.testing.assert_allclose(eight[:, 0], one_d, atol=1e-5)
    np.testing.assert_allclose(two[:, 1], column_logprobs(dense_targets[:, 1]), atol=1e-5)
    np.testing.assert_allclose(eight[:, 5], column_logprobs(torch.zeros(n, dtype=torch.long)), atol=1e-5)
    expected = -one_d.sum() - (two * dense_weights.numpy()).sum() - (eight * sparse_weights.numpy()).sum()
    assert out.metrics["loss:sum"] == pytest.approx(float(expected), rel=1e-5)


def test_chunked_forward_backward_out_of_order_matches_unchunked(service, tiny_model):
    """1100 datums exceed the SDK's 1024-datum chunk: it posts the second chunk before the first."""
    g = torch.Generator().manual_seed(4)
    pairs = torch.randint(100, 40000, (1100, 2), generator=g).tolist()
    data = [_datum(p) for p in pairs]
    chunked = service.create_lora_training_client(base_model=tiny_model, rank=4, seed=5).result()
    plain = service.create_lora_training_client(base_model=tiny_model, rank=4, seed=5).result()
    assert len(list(chunked._chunked_requests_generator(data))) == 2  # the SDK really splits this call

    whole = chunked.forward_backward(data, "cross_entropy").result()
    halves = [plain.forward_backward(data[:550], "cross_entropy").result()]
    halves.append(plain.forward_backward(data[550:], "cross_entropy").result())
    assert len(whole.loss_fn_outputs) == 1100
    np.testing.assert_allclose(
        np.concatenate(_logprobs(whole)), np.concatenate([x for h in halves for x in _logprobs(h)]), atol=1e-5
    )
    assert whole.metrics["loss:sum"] == pytest.approx(sum(h.metrics["loss:sum"] for h in halves), rel=1e-5)
    # Both chunks' gradients were accumulated before the step: the updated models agree.
    for tc in (chunked, plain):
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    np.testing.assert_allclose(_probe(chunked), _probe(plain), atol=1e-4)


# ----------------------------------------------------------------------------------------------------------
# Idempotency: the SDK's outer retries resend the same seq_id


def _post(url: str, path: str, **kwargs) -> httpx.Response:
    response = httpx.post(f"{url}/api/v1/{path}", timeout=60, **kwargs)
    assert response.status_code == 200, response.text
    return response


def _retrieve(url: str, request_id: str) -> httpx.Response:
    while True:
        response = _post(url, "retrieve_future", json={"request_id": request_id})
        if (
            "protobuf" in response.headers.get("content-type", "")
            or response.json().get("type") != "try_again"
        ):
            return response


def test_retried_requests_with_the_same_seq_id_run_once(engine, service, tiny_model):
    url = engine.url
    raw = service.create_lora_training_client(base_model=tiny_model, rank=4, seed=6).result()
    sdk = service.create_lora_training_client(base_model=tiny_model, rank=4, seed=6).result()
    data = _batch(7)

    def fwdbwd_body(seq_id: int, forward_only: bool = False) -> bytes:
        request = types.ForwardBackwardRequest(
            forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn="cross_entropy"),
            model_id=raw.model_id,
            seq_id=seq_id,
        )
        msg = request_conv.forward_backward_request_to_proto(request)
        msg.forward_only = forward_only
        return msg.SerializeToString()

    headers = {"content-type": "application/x-protobuf"}
    first = _post(url, "forward_backward", content=fwdbwd_body(1), headers=headers).json()["request_id"]
    again = _post(url, "forward_backward", content=fwdbwd_body(1), headers=headers).json()["request_id"]
    assert first == again
    optim = {
        "model_id": raw.model_id,
        "seq_id": 2,
        "adam_params": {"learning_rate": 1e-2},
        "type": "optim_step",
    }
    step_ids = {_post(url, "optim_step", json=optim).json()["request_id"] for _ in range(3)}
    assert len(step_ids) == 1
    assert "metrics" in _retrieve(url, step_ids.pop()).json()
    probe = _post(url, "forward_backward", content=fwdbwd_body(3, forward_only=True), headers=headers)
    raw_out = response_conv.deserialize_forward_backward_output(
        _retrieve(url, probe.json()["request_id"]).content
    )

    # The same work through the SDK, once: the retried gradient and step were applied exactly once.
    _step(sdk, data)
    sdk_out = sdk.forward(data, "cross_entropy").result()
    for a, b in zip(_logprobs(raw_out), _logprobs(sdk_out), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)

    # Sampling: (sampling_session_id, seq_id) identifies a request; a new seq_id is a new request.
    sampler = sdk.save_weights_and_get_sampling_client().result()
    body = {
        "sampling_session_id": sampler._sampling_session_id,
        "seq_id": 0,
        "num_samples": 1,
        "prompt": types.ModelInput.from_ints(PROMPT).model_dump(mode="json"),
        "sampling_params": {"max_tokens": 3, "temperature": 1.0},
    }
    ids = [_post(url, "asample", json=body).json()["request_id"] for _ in range(2)]
    other = _post(url, "asample", json={**body, "seq_id": 1}).json()["request_id"]
    assert ids[0] == ids[1] != other
    sampled = response_conv.deserialize_sample_response(_retrieve(url, ids[0]).content)
    assert len(sampled.sequences[0].tokens) == 3
    # Without a seq_id nothing identifies a retry: every request is new work.
    for n in range(1, 6):
        unkeyed = {**body, "sampling_params": {"max_tokens": n, "stop": []}}
        del unkeyed["seq_id"]
        reply = _retrieve(url, _post(url, "asample", json=unkeyed).json()["request_id"])
        assert len(response_conv.deserialize_sample_response(reply.content).sequences[0].tokens) == n


# ----------------------------------------------------------------------------------------------------------
# Sampling


@pytest.fixture(scope="module")
def trained_sampler(engine, tiny_model):
    """A sampler on weights one real training step away from the base model, plus its training client."""
    service = tinker.ServiceClient(base_url=engine.url)
    tc = service.create_lora_training_client(base_model=tiny_model, rank=4, seed=8).result()
    _step(tc, _batch(9), lr=5e-2)
    yield service, tc, tc.save_weights_and_get_sampling_client().result()
    finish(service)


def _sampled_datum(
    prompt: list[int], seq: types.SampledSequence, advantage: float, prompt_advantage: float = 0.0
):
    """A sampled completion as the cookbook's RL loop sends it: the prompt and sampled tokens with provenance."""
    p, n = len(prompt), len(seq.tokens)
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(prompt + seq.tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": np.array(prompt[1:] + seq.tokens, dtype=np.int64),
            "logprobs": np.array([0.0] * (p - 1) + list(seq.logprobs), dtype=np.float32),
            "advantages": np.array([prompt_advantage] * (p - 1) + [advantage] * n, dtype=np.float32),
        },
    )
    sid = seq.sequence_id
    return datum.with_provenance(
        model_input=[
            types.PromptProvenanceSpan(sequence_id=sid, length=p),
            types.SampledProvenanceSpan(sequence_id=sid, length=n - 1),
        ],
        loss_fn_inputs=[
            types.PromptProvenanceSpan(sequence_id=sid, offset=1, length=p - 1),
            types.SampledProvenanceSpan(sequence_id=sid, length=n),
        ],
    )


def test_stable_reinforce_trains_on_sequences_recorded_at_sampling(service, tiny_model):
    tc = service.create_lora_training_client(base_model=tiny_model, rank=4, seed=2).result()
    _step(tc, _batch(4), lr=5e-2)  # LoRA weights away from zero, so the sampler's adapter matters
    recording = tc.save_weights_and_get_sampling_client(record_stability_info=True).result()
    params = types.SamplingParams(max_tokens=6, temperature=1.0, seed=3, stop=[])
    seqs = recording.sample(
        types.ModelInput.from_ints(PROMPT), num_samples=2, sampling_params=params
    ).result()
    pos, neg = (_sampled_datum(PROMPT, s, a) for s, a in zip(seqs.sequences, (1.5, -2.0), strict=True))
    out = tc.forward([pos, neg], "stable_reinforce").result()
    p = len(PROMPT) - 1
    total = 0.0
    for output, seq, advantage in zip(out.loss_fn_outputs, seqs.sequences, (1.5, -2.0), strict=True):
        lp = output["logprobs"].to_numpy()[p:]
        # The sampling-time log-probabilities are the sampler's: forward on the same weights agrees with them.
        np.testing.assert_allclose(lp, seq.logprobs, atol=1e-4)
        taper = 1.0 if advantage >= 0 else min(1.0, float(np.exp((lp - np.array(seq.logprobs)).sum())))
        expected = -taper * lp * advantage
        loss = output["elementwise_loss"].to_numpy()
        np.testing.assert_allclose(loss[p:], expected, rtol=1e-4, atol=1e-6)
        assert not loss[:p].any()  # prompt tokens carry no loss
        total += float(expected.sum())
    assert out.metrics["loss:sum"] == pytest.approx(total, rel=1e-4)

    def refused(data: list[types.Datum], match: str) -> None:
        with pytest.raises(tinker.RequestFailedError, match=match):
            tc.forward(data, "stable_reinforce").result()

    plain = types.Datum(model_input=pos.model_input, loss_fn_inputs=pos.loss_fn_inputs)
    refused([plain], "needs provenance")
    refused(
        [_sampled_datum(PROMPT, seqs.sequences[0], 1.0, prompt_advantage=0.5)],
        "nonzero advantages on sampled",
    )
    # A sampler made without record_stability_info keeps nothing to train on.
    unrecorded = (
        tc.save_weights_and_get_sampling_client()
        .result()
        .sample(types.ModelInput.from_ints(PROMPT), num_samples=1, sampling_params=params)
        .result()
    )
    refused([_sampled_datum(PROMPT, unrecorded.sequences[0], 1.0)], "no such recorded sequence")
    # It trains: a positive advantage raises the sampled tokens' log-probabilities.
    before = _logprobs(tc.forward([pos], "cross_entropy").result())[0][p:].sum()
    tc.forward_backward([pos], "stable_reinforce").result()
    tc.optim_step(types.AdamParams(learning_rate=5e-3)).result()
    assert _logprobs(tc.forward([pos], "cross_entropy").result())[0][p:].sum() > before + 0.05


def test_sampled_logprobs_agree_with_forward_and_compute_logprobs(trained_sampler, tiny_model):
    service, tc, sampler = trained_sampler
    params = types.SamplingParams(max_tokens=12, temperature=1.0, seed=5, stop=[])
    result = sampler.sample(
        types.ModelInput.from_ints(PROMPT), num_samples=3, sampling_params=params
    ).result()
    assert len(result.sequences) == 3
    base = service.create_sampling_client(base_model=tiny_model).result()
    for seq in result.sequences:
        assert len(seq.tokens) == 12 and seq.stop_reason == "length"
        full = PROMPT + seq.tokens
        forward = _logprobs(tc.forward([_datum(full)], "cross_entropy").result())[0]
        np.testing.assert_allclose(seq.logprobs, forward[len(PROMPT) - 1 :], atol=1e-4)
        prompt_lps = sampler.compute_logprobs(types.ModelInput.from_ints(full)).result()
        assert prompt_lps[0] is None and len(prompt_lps) == len(full)
        np.testing.assert_allclose(prompt_lps[1:], forward, atol=1e-4)
        # The sampler really uses the trained adapter: the base model scores the same tokens differently.
        base_lps = base.compute_logprobs(types.ModelInput.from_ints(full)).result()
        assert np.abs(np.array(base_lps[1:]) - forward).max() > 1e-2


def test_sampler_weights_saved_again_under_the_same_name_are_served(service, tiny_model):
    tc = service.create_lora_training_client(base_model=tiny_model, rank=4, seed=22).result()
    full = types.ModelInput.from_ints(PROMPT)
    path = tc.save_weights_for_sampler("latest").result().path
    before = service.create_sampling_client(model_path=path).result().compute_logprobs(full).result()
    _step(tc, _batch(23), lr=5e-2)
    assert tc.save_weights_for_sampler("latest").result().path == path
    after = service.create_sampling_client(model_path=path).result().compute_logprobs(full).result()
    np.testing.assert_allclose(after[1:], _probe(tc), atol=1e-4)  # the new weights, not the old ones
    assert np.abs(np.array(after[1:]) - np.array(before[1:])).max() > 1e-2


def test_a_fixed_seed_gives_identical_samples(trained_sampler):
    _, _, sampler = trained_sampler
    prompt = types.ModelInput.from_ints(PROMPT)

    def sample(seed: int) -> types.SampleResponse:
        params = types.SamplingParams(max_tokens=10, temperature=1.0, seed=seed, stop=[])
        return sampler.sample(prompt, num_samples=4, sampling_params=params)

    # Submitted together, so the engine batches them into one generation call.
    futures = [sample(123), sample(123), sample(124)]
    first, second, other = [[s.tokens for s in f.result().sequences] for f in futures]
    assert first == second
    assert len({tuple(t) for t in first}) > 1  # the samples of one request differ from each other
    assert other != first
    alone = [s.tokens for s in sample(123).result().sequences]  # alone in its batch: still the same
    assert alone == first


def test_a_seeded_session_reproduces_the_lora_initialisation_and_unseeded_samples(
    engine, services, tiny_model, monkeypatch
):
    """The cookbook's loops create the LoRA and sample rollouts without a seed. A session tagged `seed=N` (the SDK
    sends TINKER_TAGS) gets seeds derived from N: the same trained weights and samples, whatever the order in
    which concurrent requests arrive; another N (or no tag) gives others."""

    def run(tags: str | None) -> tuple[np.ndarray, list]:
        if tags is None:
            monkeypatch.delenv("TINKER_TAGS", raising=False)
        else:
            monkeypatch.setenv("TINKER_TAGS", tags)
        service = services(base_url=engine.url, api_key="tml-local-test")
        tc = service.create_lora_training_client(base_model=tiny_model, rank=4).result()
        _step(tc, _batch(0))
        sampler = tc.save_weights_and_get_sampling_client().result()
        params = types.SamplingParams(max_tokens=8, temperature=1.0, stop=[])
        prompts = [PROMPT, PROMPT[:5], PROMPT, PROMPT[:5]]
        futures = [sampler.sample(types.ModelInput.from_ints(p), 2, params) for p in prompts]
        return _probe(tc), [[s.tokens for s in f.result().sequences] for f in futures]

    weights, samples = run("posttrain,seed=7")
    again_weights, again_samples = run("seed=7,other")
    np.testing.assert_array_equal(weights, again_weights)
    # The same draws for each prompt; which of two identical concurrent requests gets which draw depends on their
    # arrival (seeding.py: identical prompts are interchangeable), so the two of each prompt compare as a set.
    assert sorted(samples[0::2]) == sorted(again_samples[0::2]) and sorted(samples[1::2]) == sorted(
        again_samples[1::2]
    )
    assert samples[0] != samples[2]  # the same prompt asked twice: two draws, not one repeated
    other_weights, other_samples = run("seed=8")
    assert np.abs(weights - other_weights).max() > 1e-4 and samples != other_samples
    unseeded = [run(None)[0] for _ in range(2)]
    assert np.abs(unseeded[0] - unseeded[1]).max() > 1e-4  # no tag: a fresh draw each time, as the SDK means


def test_stop_strings_and_stop_tokens_end_the_returned_tokens(trained_sampler, tiny_model):
    _, _, sampler = trained_sampler
    tokenizer = reference_tokenizer(tiny_model)
    prompt = types.ModelInput.from_ints(PROMPT)

    def sample(stop, max_tokens: int = 24) -> types.SampledSequence:
        # Seeded, so every call draws the same tokens until it stops (greedy just repeats one token here).
        params = types.SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=21, stop=stop)
        return sampler.sample(prompt, num_samples=1, sampling_params=params).result().sequences[0]

    free = sample([])
    assert free.stop_reason == "length" and len(free.tokens) == 24
    text = tokenizer.decode(free.tokens)
    # A stop string whose first occurrence in the sampled text starts at token k >= 3.
    k, stop = next(
        (k, piece)
        for k in range(3, 20)
        if len(piece := tokenizer.decode(free.tokens[k : k + 1]).strip()) >= 2
        and text.find(piece) >= len(tokenizer.decode(free.tokens[:k]))
    )
    stopped = sample(stop)
    assert stopped.stop_reason == "stop"
    assert stopped.tokens == free.tokens[: len(stopped.tokens)]
    assert stop in tokenizer.decode(stopped.tokens)  # the stop string's tokens are returned
    assert stop not in tokenizer.decode(stopped.tokens[:-1])  # and generation ended right there
    assert len(stopped.tokens) == k + 1
    assert len(stopped.logprobs) == len(stopped.tokens)

    token = free.tokens[5]
    by_token = sample([token])
    assert by_token.stop_reason == "stop"
    assert by_token.tokens == free.tokens[: free.tokens.index(token) + 1]
    assert sample([], max_tokens=4).tokens == free.tokens[:4]


# ----------------------------------------------------------------------------------------------------------
# Checkpoints and resume


def test_resume_with_optimizer_matches_the_uninterrupted_run(service, tiny_model):
    a = service.create_lora_training_client(base_model=tiny_model, rank=4, seed=10).result()
    _step(a, _batch(11))
    saved = a.save_state("mid").result().path
    assert saved == f"tinker://{a.model_id}/weights/mid"
    at_save = _probe(a)
    _step(a, _batch(12))
    uninterrupted = _probe(a)

    b = service.create_training_client_from_state_with_optimizer(saved).result()
    # Create-from-state: the SDK derives the id itself, so the server must create exactly this one.
    assert (
        re.fullmatch(re.escape(_session_id(service)) + r":train:\d+", b.model_id) and b.model_id != a.model_id
    )
    np.testing.assert_allclose(_probe(b), at_save, atol=1e-5)
    _step(b, _batch(12))
    np.testing.assert_allclose(_probe(b), uninterrupted, atol=1e-5)

    # Without the optimizer state Adam starts over, and the same step lands elsewhere.
    c = service.create_training_client_from_state(saved).result()
    np.testing.assert_allclose(_probe(c), at_save, atol=1e-5)
    _step(c, _batch(12))
    assert np.abs(_probe(c) - uninterrupted).max() > 1e-3


def test_rest_client_runs_checkpoints_weights_info_and_delete(engine, service, tiny_model):
    rest = tinker.RestClient(base_url=engine.url)
    capabilities = rest.get_server_capabilities().result()
    [model] = [m for m in capabilities.supported_models if m.model_name == tiny_model]
    assert model.max_context_length == 2048
    tc = service.create_lora_training_client(
        base_model=tiny_model, rank=4, seed=13, train_mlp=False, user_metadata={"purpose": "rest"}
    ).result()
    state = tc.save_state("r1", ttl_seconds=3600).result().path
    sampler_path = tc.save_weights_for_sampler("r1").result().path
    assert sampler_path == f"tinker://{tc.model_id}/sampler_weights/r1"

    listed = rest.list_checkpoints(tc.model_id).result().checkpoints
    assert {c.checkpoint_id: c.checkpoint_type for c in listed} == {
        "weights/r1": "training",
        "sampler_weights/r1": "sampler",
    }
    assert all(c.size_bytes and c.size_bytes > 0 for c in listed)
    assert next(c for c in listed if c.checkpoint_id == "weights/r1").expires_at is not None
    mine = [c.tinker_path for c in rest.list_user_checkpoints(limit=1000).result().checkpoints]
    assert state in mine and sampler_path in mine

    runs = rest.list_training_runs(limit=1000).result()
    assert tc.model_id in [r.training_run_id for r in runs.training_runs]
    run = rest.get_training_run(tc.model_id).result()
    assert (run.base_model, run.is_lora, run.lora_rank) == (tiny_model, True, 4)
    assert run.user_metadata == {"purpose": "rest"}
    assert run.last_checkpoint.tinker_path == state
    assert rest.get_training_run_by_tinker_path(sampler_path).result().training_run_id == tc.model_id

    info = rest.get_weights_info_by_tinker_path(state).result()
    assert (info.base_model, info.is_lora, info.lora_rank) == (tiny_model, True, 4)
    assert (info.train_mlp, info.train_attn, info.train_unembed) == (False, True, True)

    sampler = service.create_sampling_client(model_path=sampler_path).result()
    assert sampler.get_base_model() == tiny_model
    assert rest.get_sampler(sampler._sampling_session_id).result().model_path == sampler_path

    rest.delete_checkpoint_from_tinker_path(state).result()
    assert [c.checkpoint_id for c in rest.list_checkpoints(tc.model_id).result().checkpoints] == [
        "sampler_weights/r1"
    ]
    with pytest.raises(tinker.NotFoundError, match="not found"):
        rest.delete_checkpoint_from_tinker_path(state).result()


# ----------------------------------------------------------------------------------------------------------
# Bad requests


def test_bad_requests_fail_clearly_and_the_server_keeps_serving(service, tiny_model, engine_dirs):
    started = time.monotonic()
    with pytest.raises(tinker.RequestFailedError, match=r"model 'no/such-model' is not served.*available: "):
        service.create_lora_training_client(base_model="no/such-model", rank=4).result()
    tc = service.create_lora_training_client(base_model=tiny_model, rank=4, seed=14).result()

    with pytest.raises(
        tinker.RequestFailedError, match="token id 49152 is outside the vocabulary.*size 49152"
    ):
        tc.forward([_datum([5, 6, 49152, 7])], "cross_entropy").result()
    with pytest.raises(tinker.RequestFailedError, match="target_tokens: token id -3 is outside"):
        bad_target = types.Datum(
            model_input=types.ModelInput.from_ints([5, 6]), loss_fn_inputs={"target_tokens": [6, -3]}
        )
        tc.forward([bad_target], "cross_entropy").result()
    missing = types.Datum(
        model_input=types.ModelInput.from_ints([5, 6, 7]),
        loss_fn_inputs={"target_tokens": [6, 7, 8], "logprobs": [-1.0, -1.0, -1.0]},
    )
    with pytest.raises(
        tinker.RequestFailedError, match=r"needs loss_fn_inputs\['advantages'\], which is missing"
    ):
        tc.forward_backward([missing], "importance_sampling").result()

    checkpoints = engine_dirs / "checkpoints"
    before = sorted(p.relative_to(engine_dirs) for p in engine_dirs.rglob("*"))
    for name in ("../../escape", "../escape", "a/b", ".hidden"):
        with pytest.raises(tinker.RequestFailedError, match="is not allowed"):
            tc.save_state(name).result()
        with pytest.raises(tinker.RequestFailedError, match="is not allowed"):
            tc.save_weights_for_sampler(name).result()
    assert sorted(p.relative_to(engine_dirs) for p in engine_dirs.rglob("*")) == before
    assert not (checkpoints.parent / "escape").exists()
    with pytest.raises(tinker.RequestFailedError, match="not found"):
        service.create_training_client_from_state(f"tinker://{tc.model_id}/weights/never-saved").result()

    sampler = service.create_sampling_client(base_model=tiny_model).result()
    with pytest.raises(tinker.RequestFailedError, match="prompt: token id 1000000 is outside the vocabulary"):
        sampler.sample(types.ModelInput.from_ints([5, 10**6]), 1, types.SamplingParams(max_tokens=2)).result()
    with pytest.raises(tinker.RequestFailedError, match=r"top_p must be in \(0, 1\]"):
        sampler.sample(
            types.ModelInput.from_ints([5]), 1, types.SamplingParams(max_tokens=2, top_p=0.0)
        ).result()
    # Failed requests are not retried for minutes, and the server still serves.
    assert time.monotonic() - started < 60
    assert _logprobs(tc.forward([_datum(PROMPT)], "cross_entropy").result())[0].shape == (len(PROMPT) - 1,)
    assert (
        len(
            sampler.sample(types.ModelInput.from_ints([5]), 2, types.SamplingParams(max_tokens=2))
            .result()
            .sequences
        )
        == 2
    )


# ----------------------------------------------------------------------------------------------------------
# A second engine: API key, two models at once, restart


def test_api_key_is_enforced(keyed_engine):
    url = keyed_engine.url
    with pytest.raises(tinker.AuthenticationError, match="missing or wrong X-API-Key"):
        tinker.RestClient(base_url=url, api_key="tml-wrong-key").get_server_capabilities().result()
    with pytest.raises(tinker.AuthenticationError, match="missing or wrong X-API-Key"):
        tinker.ServiceClient(base_url=url, api_key="tml-wrong-key").create_lora_training_client(
            base_model="x"
        )
    response = httpx.get(f"{url}/api/v1/healthz")
    assert response.status_code == 401 and "--api-key" in response.json()["detail"]
    right = httpx.get(f"{url}/api/v1/healthz", headers={"X-API-Key": os.environ["TINKER_API_KEY"]})
    assert right.status_code == 200


def test_teacher_and_student_models_served_at_once(keyed_engine, tiny_model, tiny_model_b, services):
    service = services(base_url=keyed_engine.url)
    capabilities = tinker.RestClient(base_url=keyed_engine.url).get_server_capabilities().result()
    names = [m.model_name for m in capabilities.supported_models]
    assert names == [tiny_model, tiny_model_b]
    teacher = service.create_sampling_client(base_model=tiny_model).result()
    student = service.create_lora_training_client(base_model=tiny_model_b, rank=4, seed=15).result()
    full = types.ModelInput.from_ints(PROMPT)
    # Interleave: teacher scoring, student training, teacher again; each stays its own model.
    teacher_lp = teacher.compute_logprobs(full)
    fb = student.forward_backward([_datum(PROMPT)], "cross_entropy")
    teacher_lp, student_lp = np.array(teacher_lp.result()[1:]), _logprobs(fb.result())[0]
    assert np.abs(teacher_lp - student_lp).max() > 0.1  # different random weights
    student.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    np.testing.assert_allclose(teacher.compute_logprobs(full).result()[1:], teacher_lp, atol=1e-5)
    # A teacher checkpoint: both base_model and model_path, as the distillation recipe sends them.
    trained = service.create_lora_training_client(base_model=tiny_model, rank=4, seed=16).result()
    _step(trained, _batch(17), lr=5e-2)
    path = trained.save_weights_for_sampler("teacher").result().path
    tuned = service.create_sampling_client(base_model=tiny_model, model_path=path).result()
    tuned_lp = np.array(tuned.compute_logprobs(full).result()[1:])
    np.testing.assert_allclose(tuned_lp, _probe(trained), atol=1e-4)
    with pytest.raises(Exception, match="was trained on"):
        service.create_sampling_client(base_model=tiny_model_b, model_path=path).result()


def test_checkpoints_survive_a_server_restart(keyed_engine, tiny_model_b, services):
    service = services(base_url=keyed_engine.url)
    tc = service.create_lora_training_client(base_model=tiny_model_b, rank=4, seed=18).result()
    _step(tc, _batch(19))
    state = tc.save_state("before-restart").result().path
    sampler_path = tc.save_weights_for_sampler("before-restart").result().path
    params = types.SamplingParams(max_tokens=6, temperature=1.0, seed=7, stop=[])
    prompt = types.ModelInput.from_ints(PROMPT)
    sampled = (
        service.create_sampling_client(model_path=sampler_path).result().sample(prompt, 2, params).result()
    )
    _step(tc, _batch(20))
    uninterrupted = _probe(tc)
    run_id = tc.model_id

    # A long generation is still computing when the server is told to stop: it must not delay the stop.
    sampler = service.create_sampling_client(base_model=tiny_model_b).result()
    long_job = {
        "sampling_session_id": sampler._sampling_session_id,
        "seq_id": 1000,
        "num_samples": 64,
        "prompt": prompt.model_dump(mode="json"),
        "sampling_params": {"max_tokens": 2000, "stop": []},
    }
    headers = {"X-API-Key": os.environ["TINKER_API_KEY"]}
    _post(keyed_engine.url, "asample", json=long_job, headers=headers)
    time.sleep(1.0)
    started = time.monotonic()
    keyed_engine.stop()
    assert time.monotonic() - started < 15
    keyed_engine.start()

    service = services(base_url=keyed_engine.url)
    rest = tinker.RestClient(base_url=keyed_engine.url)
    ids = {c.checkpoint_id for c in rest.list_checkpoints(run_id).result().checkpoints}
    assert ids == {"weights/before-restart", "sampler_weights/before-restart"}
    assert rest.get_training_run(run_id).result().base_model == tiny_model_b
    assert rest.get_weights_info_by_tinker_path(state).result().lora_rank == 4
    again = (
        service.create_sampling_client(model_path=sampler_path).result().sample(prompt, 2, params).result()
    )
    assert [s.tokens for s in again.sequences] == [s.tokens for s in sampled.sequences]
    for before, after in zip(sampled.sequences, again.sequences, strict=True):
        np.testing.assert_allclose(after.logprobs, before.logprobs, atol=1e-5)
    resumed = service.create_training_client_from_state_with_optimizer(state).result()
    _step(resumed, _batch(20))
    np.testing.assert_allclose(_probe(resumed), uninterrupted, atol=1e-5)
    assert math.isfinite(float(_probe(resumed).sum()))


def test_engine_log_has_no_warnings(engine, engine_dirs):
    """Deprecation and peft warnings stay out of the server log (checked after the tests above ran)."""
    log = (engine_dirs / "engine.log").read_text()
    assert "posttrain engine ready at" in log
    for noise in ("Warning", "on_event", "tie_word_embeddings", "Traceback", " ERROR "):
        assert noise not in log, noise
