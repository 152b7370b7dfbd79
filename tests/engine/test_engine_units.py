"""Fast unit tests of the engine's pure parts: loss formulas, wire encodings (checked against the tinker SDK's own
converters), checkpoint names and storage, micro-batching. No server, no model."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import zstandard
from tinker import types
from tinker.proto import request_conv, response_conv

from posttrain.engine import losses
from posttrain.engine.checkpoints import CheckpointRef, CheckpointStore, check_name, parse_tinker_path
from posttrain.engine.packing import micro_batches
from posttrain.engine.wire import (
    WireError,
    decode_forward_backward,
    encode_forward_backward_output,
    encode_sample_response,
    tokens_from_model_input,
)

# ----------------------------------------------------------------------------------------------------------
# Losses: each per-token formula against a hand computation with plain Python floats

LP = [-0.5, -1.0, -2.0, -0.1]  # learner logprobs
Q = [-0.7, -0.6, -2.0, -0.9]  # sampler logprobs
A = [1.0, -2.0, 0.5, 3.0]  # advantages


def _inputs(**extra: list[float]) -> dict[str, torch.Tensor]:
    base = {
        "target_tokens": torch.tensor([5, 6, 7, 8]),
        "logprobs": torch.tensor(Q),
        "advantages": torch.tensor(A),
    }
    base.update({k: torch.tensor(v) for k, v in extra.items()})
    return base


def _per_token(
    name: str, config: dict | None = None, lp: list[float] = LP, **extra: list[float]
) -> list[float]:
    out = losses.get_loss(name)(torch.tensor(lp), _inputs(**extra), config or {})
    assert out.shape == (len(lp),)
    return out.tolist()


def test_cross_entropy_is_negative_weighted_logprob_and_weights_default_to_one():
    weights = [1.0, 0.0, 0.5, -2.0]  # real-valued and negative weights are allowed (forward_backward_custom)
    assert _per_token("cross_entropy", weights=weights) == pytest.approx(
        [-lp * w for lp, w in zip(LP, weights, strict=True)]
    )
    no_weights = losses.cross_entropy(torch.tensor(LP), {"target_tokens": torch.tensor([1, 2, 3, 4])}, {})
    assert no_weights.tolist() == pytest.approx([-lp for lp in LP])


def test_importance_sampling_is_ratio_times_advantage():
    expected = [-math.exp(lp - q) * a for lp, q, a in zip(LP, Q, A, strict=True)]
    assert _per_token("importance_sampling") == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(("low", "high"), [(0.8, 1.2), (0.9, 1.05)])
def test_ppo_clips_the_ratio_pessimistically(low: float, high: float):
    expected = []
    for lp, q, a in zip(LP, Q, A, strict=True):
        r = math.exp(lp - q)
        expected.append(-min(r * a, min(max(r, low), high) * a))
    config = {} if (low, high) == (0.8, 1.2) else {"clip_low_threshold": low, "clip_high_threshold": high}
    got = _per_token("ppo", config)
    assert got == pytest.approx(expected, rel=1e-6)
    # The example really exercises both clip sides: some ratio is above `high`, some below `low`.
    ratios = [math.exp(lp - q) for lp, q in zip(LP, Q, strict=True)]
    assert max(ratios) > high and min(ratios) < low


def test_cispo_value_and_gradient_use_a_stopped_clipped_ratio():
    lp = torch.tensor(LP, requires_grad=True)
    out = losses.cispo(lp, _inputs(), {"clip_low_threshold": 0.0, "clip_high_threshold": 1.1})
    clipped = [min(max(math.exp(a - b), 0.0), 1.1) for a, b in zip(LP, Q, strict=True)]
    assert out.tolist() == pytest.approx(
        [-c * x * a for c, x, a in zip(clipped, LP, A, strict=True)], rel=1e-6
    )
    out.sum().backward()
    # d/dlp of -sg(clip(r)) * lp * A is -clip(r) * A: no gradient flows through the ratio.
    assert lp.grad.tolist() == pytest.approx([-c * a for c, a in zip(clipped, A, strict=True)], rel=1e-6)
    # Documented defaults are 0 and 4 (not PPO's 0.8/1.2).
    default = _per_token("cispo")
    assert default == pytest.approx(
        [-min(max(math.exp(a - b), 0.0), 4.0) * a * adv for a, b, adv in zip(LP, Q, A, strict=True)], rel=1e-6
    )


def test_dro_is_advantage_term_minus_quadratic_penalty():
    beta = 0.3
    expected = [-(lp * a - 0.5 * beta * (lp - q) ** 2) for lp, q, a in zip(LP, Q, A, strict=True)]
    assert _per_token("dro", {"beta": beta}) == pytest.approx(expected, rel=1e-6)


def test_gspo_token_ratio_has_the_sequence_value_and_its_own_gradient():
    # The sequence log-ratio: the mean of lp - q over the masked tokens (here tokens 1 and 3).
    mask = [0.0, 1.0, 0.0, 1.0]
    stat = losses.SEQUENCE_STATISTICS["gspo"](torch.tensor(LP), _inputs(sequence_ratio_mask=mask))
    mean = ((LP[1] - Q[1]) + (LP[3] - Q[3])) / 2
    assert stat.tolist() == pytest.approx([mean] * 4, rel=1e-6)
    lp = torch.tensor(LP, requires_grad=True)
    out = losses.gspo(lp, {**_inputs(), "sequence_log_ratio": stat}, {"clip_high_threshold": 1.1})
    s = math.exp(mean)
    expected = [-min(s * a, min(max(s, 0.8), 1.1) * a) for a in A]
    assert out.tolist() == pytest.approx(expected, rel=1e-6)
    out.sum().backward()
    # d/dlp_t: -s * A_t where the unclipped term is the minimum, 0 where the clipped (constant) one is.
    unclipped = [s * a <= min(max(s, 0.8), 1.1) * a for a in A]
    assert lp.grad.tolist() == pytest.approx(
        [-s * a if u else 0.0 for a, u in zip(A, unclipped, strict=True)]
    )
    assert any(unclipped) and not all(unclipped)
    # Without a mask: the tokens with an advantage (here all); an all-zero mask: ratio 1.
    no_mask = losses.SEQUENCE_STATISTICS["gspo"](torch.tensor(LP), _inputs())
    assert no_mask[0] == pytest.approx(sum(x - q for x, q in zip(LP, Q, strict=True)) / 4, rel=1e-6)
    assert (
        losses.SEQUENCE_STATISTICS["gspo"](torch.tensor(LP), _inputs(sequence_ratio_mask=[0.0] * 4))[0] == 0
    )


def test_stable_reinforce_tapers_only_negative_advantages_by_the_truncated_sequence_ratio():
    sampled = [1.0, 1.0, 1.0, 0.0]
    advantages = [1.0, -2.0, 0.5, 0.0]
    inputs = {
        **_inputs(advantages=advantages),
        "sampler_logprobs": torch.tensor(Q),
        "sampled": torch.tensor(sampled),
    }
    rho = sum((x - q) * m for x, q, m in zip(LP, Q, sampled, strict=True))
    stat = losses.SEQUENCE_STATISTICS["stable_reinforce"](torch.tensor(LP), inputs)
    assert stat.tolist() == pytest.approx([rho] * 4, rel=1e-6)
    lp = torch.tensor(LP, requires_grad=True)
    out = losses.stable_reinforce(lp, {**inputs, "sequence_log_ratio": stat}, {})
    taper = min(1.0, math.exp(rho))
    weights = [taper if a < 0 else 1.0 for a in advantages]
    assert taper < 1.0  # the example exercises the taper
    expected = [-w * x * a * m for w, x, a, m in zip(weights, LP, advantages, sampled, strict=True)]
    assert out.tolist() == pytest.approx(expected, rel=1e-6)
    out.sum().backward()
    assert lp.grad.tolist() == pytest.approx(
        [-w * a * m for w, a, m in zip(weights, advantages, sampled, strict=True)]
    )
    # On-policy (ratio 1) its gradient is importance_sampling's: -A per sampled token.
    on_policy = {**inputs, "sequence_log_ratio": torch.zeros(4)}
    lp2 = torch.tensor(LP, requires_grad=True)
    losses.stable_reinforce(lp2, on_policy, {}).sum().backward()
    lp3 = torch.tensor(LP, requires_grad=True)
    losses.importance_sampling(lp3, {**inputs, "logprobs": lp3.detach()}, {}).sum().backward()
    assert lp2.grad.tolist() == pytest.approx(lp3.grad.tolist())


def test_loss_config_and_names_are_validated():
    with pytest.raises(WireError, match="loss_fn_config\\['beta'\\] must be a number"):
        _per_token("dro", {"beta": "big"})
    with pytest.raises(WireError, match="'custom' is not supported.*cross_entropy"):
        losses.get_loss("custom")


def test_check_inputs_names_the_missing_or_misshapen_input():
    ok = _inputs()
    losses.check_inputs("ppo", 0, 4, ok)
    missing = {k: v for k, v in ok.items() if k != "advantages"}
    with pytest.raises(WireError, match="datum 3: loss_fn 'ppo' needs loss_fn_inputs\\['advantages'\\]"):
        losses.check_inputs("ppo", 3, 4, missing)
    with pytest.raises(WireError, match="target_tokens has shape \\[4\\]; expected \\[5\\]"):
        losses.check_inputs("cross_entropy", 0, 5, ok)
    with pytest.raises(WireError, match="'weights'\\] has shape \\[3\\], expected \\[4\\]"):
        losses.check_inputs("cross_entropy", 0, 4, {**ok, "weights": torch.ones(3)})
    two_d = {"target_tokens": torch.zeros(4, 3, dtype=torch.long), "weights": torch.ones(4, 3)}
    losses.check_inputs("cross_entropy", 0, 4, two_d)


# ----------------------------------------------------------------------------------------------------------
# Wire: requests built by the SDK's encoder, replies read by the SDK's decoders


def _sdk_request_bytes(
    data: list[types.Datum], loss_fn: str, config: dict | None = None, seq_id: int = 7
) -> bytes:
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn=loss_fn, loss_fn_config=config),
        model_id="sess:train:0",
        seq_id=seq_id,
    )
    return request_conv.forward_backward_request_to_proto(request).SerializeToString()


def test_forward_backward_request_round_trip_dense_sparse_and_config():
    dense = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2, 3]),
        loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [0.0, 1.0, 0.5]},
    )
    # [N, K] targets: the SDK sends them as sparse CSR (zeros implicit) when that is smaller than dense.
    top2 = torch.zeros(3, 8, dtype=torch.long)
    top2[0, 0], top2[1, 1], top2[2, 0], top2[2, 5] = 5, 7, 8, 9
    top2_w = torch.zeros(3, 8)
    top2_w[0, 0], top2_w[1, 1], top2_w[2, 0], top2_w[2, 5] = 0.25, 1.0, 0.5, 0.5
    sparse = types.Datum(
        model_input=types.ModelInput.from_ints([4, 5]).append_int(6),
        loss_fn_inputs={"target_tokens": top2, "weights": top2_w},
    )
    assert sparse.loss_fn_inputs["target_tokens"].sparse_crow_indices is not None  # really sent sparse
    body = _sdk_request_bytes([dense, sparse], "cross_entropy", {"clip_low_threshold": 0.5, "mode": "x"})

    for encoding, payload in [(None, body), ("zstd", zstandard.ZstdCompressor().compress(body))]:
        request = decode_forward_backward(payload, encoding)
        assert (request.model_id, request.seq_id, request.loss_fn) == ("sess:train:0", 7, "cross_entropy")
        assert request.forward_only is False
        # strings only in the v2 map
        assert request.loss_fn_config == {"clip_low_threshold": 0.5, "mode": "x"}
        assert [d.tokens for d in request.data] == [[1, 2, 3], [4, 5, 6]]
        first, second = request.data
        assert first.inputs["target_tokens"].dtype == torch.int64
        assert first.inputs["target_tokens"].tolist() == [2, 3, 4]
        assert first.inputs["weights"].tolist() == [0.0, 1.0, 0.5]
        assert second.inputs["target_tokens"].tolist() == top2.tolist()
        assert second.inputs["weights"].tolist() == top2_w.tolist()


def test_forward_backward_request_errors_are_clear():
    with pytest.raises(WireError, match="not a ForwardBackwardRequest protobuf"):
        decode_forward_backward(b"\xff\xff\xff not protobuf", None)
    image = types.Datum(
        model_input=types.ModelInput(
            chunks=[types.ImageChunk(data=b"\x89PNG", format="png", expected_tokens=4)]
        ),
        loss_fn_inputs={"target_tokens": [1, 2, 3, 4]},
    )
    # Image chunks are decoded as sent; the serving model lays them out or refuses them (engine/test_vision.py).
    (decoded,) = decode_forward_backward(_sdk_request_bytes([image], "cross_entropy"), None).data
    assert decoded.tokens == [] and decoded.parts is not None
    sent = decoded.parts[0]
    assert (sent.data, sent.format, sent.expected_tokens) == (b"\x89PNG", "png", 4)


def test_malformed_tensors_are_rejected_not_trusted():
    from tinker.proto import tinker_public_pb2 as pb

    def request_with(tensor: pb.Tensor) -> bytes:
        msg = pb.ForwardBackwardRequest(model_id="m", seq_id=1, loss_fn="cross_entropy")
        datum = msg.data.add()
        datum.model_input.add().encoded_text.tokens = np.array([1, 2], np.int32).tobytes()
        datum.loss_fn_inputs["target_tokens"].CopyFrom(tensor)
        return msg.SerializeToString()

    def csr(crow: list[int], col: list[int], values: list[int], shape: list[int]) -> pb.Tensor:
        tensor = pb.Tensor(dtype=pb.DTYPE_INT64, shape=shape)
        tensor.sparse_csr.values = np.array(values, np.int64).tobytes()
        tensor.sparse_csr.crow_indices = np.array(crow, np.int64).tobytes()
        tensor.sparse_csr.col_indices = np.array(col, np.int64).tobytes()
        return tensor

    good = decode_forward_backward(request_with(csr([0, 1, 2], [3, 0], [9, 8], [2, 4])), None)
    assert good.data[0].inputs["target_tokens"].tolist() == [[0, 0, 0, 9], [8, 0, 0, 0]]
    for bad in [
        csr([0, 1, 2], [4, 0], [9, 8], [2, 4]),  # column out of range: would write out of bounds
        csr([0, 2, 1], [0, 1], [9, 8], [2, 4]),  # row pointers going backwards
        csr([0, 1], [0], [9], [2, 4]),  # too few row pointers
        csr([0, 1, 3], [0, 1], [9, 8], [2, 4]),  # more entries claimed than sent
    ]:
        with pytest.raises(WireError, match="inconsistent sparse CSR indices"):
            decode_forward_backward(request_with(bad), None)
    ragged = pb.Tensor(dtype=pb.DTYPE_INT64, shape=[2], dense=b"\x00" * 12)
    with pytest.raises(WireError, match="12 bytes is not a whole number of int64"):
        decode_forward_backward(request_with(ragged), None)
    wrong_shape = pb.Tensor(dtype=pb.DTYPE_INT64, shape=[3], dense=np.array([1, 2], np.int64).tobytes())
    with pytest.raises(WireError, match="shape \\[3\\] does not match 2 values"):
        decode_forward_backward(request_with(wrong_shape), None)


def test_forward_backward_output_decodes_with_the_sdk_including_mixed_shapes():
    outputs = [
        {
            "logprobs": np.array([-1.0, -2.0], np.float32),
            "elementwise_loss": np.array([1.0, 2.0], np.float32),
        },
        {"logprobs": np.array([-3.0], np.float32), "elementwise_loss": np.array([3.0], np.float32)},
        {
            "logprobs": -np.arange(6, dtype=np.float32).reshape(3, 2),
            "elementwise_loss": np.ones((3, 2), np.float32),
        },
    ]
    decoded = response_conv.deserialize_forward_backward_output(
        encode_forward_backward_output(outputs, {"loss:sum": 6.5})
    )
    assert decoded.metrics == {"loss:sum": 6.5}
    assert len(decoded.loss_fn_outputs) == 3
    for sent, got in zip(outputs, decoded.loss_fn_outputs, strict=True):
        for name in ("logprobs", "elementwise_loss"):
            assert got[name].shape == list(sent[name].shape)
            np.testing.assert_array_equal(got[name].to_numpy(), sent[name])


def test_sample_response_decodes_with_the_sdk():
    payload = encode_sample_response(
        [([5, 6, 2], [-0.5, -1.5, -0.25], "stop"), ([7], [-3.0], "length")], [float("nan"), -1.25, -0.5]
    )
    response = response_conv.deserialize_sample_response(payload)
    first, second = response.sequences
    assert (first.tokens, first.stop_reason) == ([5, 6, 2], "stop")
    assert first.logprobs == pytest.approx([-0.5, -1.5, -0.25])
    assert (second.tokens, second.logprobs, second.stop_reason) == ([7], [-3.0], "length")
    assert response.prompt_logprobs == [None, -1.25, -0.5]  # NaN at index 0 becomes None
    no_prompt = response_conv.deserialize_sample_response(
        encode_sample_response([([1], [-1.0], "stop")], None)
    )
    assert no_prompt.prompt_logprobs is None


def test_tokens_from_model_input_uses_the_sdk_json_shape():
    model_input = types.ModelInput.from_ints([1, 2]).append_int(3)
    assert tokens_from_model_input(model_input.model_dump(mode="json")) == [1, 2, 3]
    with pytest.raises(WireError, match="image chunks are not supported"):
        tokens_from_model_input({"chunks": [{"type": "image", "data": "", "format": "png"}]})


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: names, paths, atomic writes


@pytest.mark.parametrize("name", ["000020", "final", "step-3.v2", "a_b", "x" * 200])
def test_check_name_accepts_cookbook_style_names(name: str):
    assert check_name(name) == name


@pytest.mark.parametrize(
    "name", ["", ".", "..", "../escape", "a/b", "/abs", ".hidden", "a\\b", "x" * 201, "sp ace", "nul\x00"]
)
def test_check_name_rejects_path_escapes_and_odd_names(name: str):
    with pytest.raises(WireError, match="is not allowed"):
        check_name(name)


def test_parse_tinker_path():
    ref = parse_tinker_path("tinker://s1:train:0/sampler_weights/000002")
    assert ref == CheckpointRef("s1:train:0", "sampler_weights", "000002")
    assert ref.tinker_path == "tinker://s1:train:0/sampler_weights/000002"
    for bad, message in [
        ("s1:train:0/weights/x", "not a tinker:// checkpoint path"),
        ("tinker://s1:train:0/other/x", "expected tinker://RUN_ID/weights/NAME"),
        ("tinker://s1/weights/a/b", "expected tinker://RUN_ID/weights/NAME"),
        ("tinker://../weights/x", "invalid run id"),
        ("tinker://run/weights/..", "is not allowed"),
    ]:
        with pytest.raises(WireError, match=message):
            parse_tinker_path(bad)


def test_checkpoint_store_round_trip_overwrite_list_delete(tmp_path):
    store = CheckpointStore(tmp_path)
    store.write_run("s:train:0", {"base_model": "m", "lora": {"rank": 4}})
    assert store.read_run("s:train:0")["base_model"] == "m"
    assert store.list_runs() == ["s:train:0"]
    ref = CheckpointRef("s:train:0", "weights", "000001")
    adapter = {"layer.lora_A.weight": torch.arange(6.0).reshape(2, 3)}
    optimizer = {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    store.save(ref, adapter, {"base_model": "m", "step": 3}, optimizer=optimizer)

    loaded, meta, opt = store.load(ref, with_optimizer=True)
    assert torch.equal(loaded["layer.lora_A.weight"], adapter["layer.lora_A.weight"])
    assert meta["step"] == 3 and "time" in meta
    assert opt["param_groups"][0]["lr"] == 0.1 and float(opt["state"][0]["step"]) == 3.0

    with pytest.raises(WireError, match="already exists"):
        store.save(ref, adapter, {"base_model": "m"})
    store.save(
        ref, {"layer.lora_A.weight": torch.zeros(2, 3)}, {"base_model": "m", "step": 4}, overwrite=True
    )
    assert store.load(ref, with_optimizer=False)[1]["step"] == 4
    with pytest.raises(WireError, match="has no optimizer state"):
        store.load(ref, with_optimizer=True)  # the overwrite saved none

    sampler = CheckpointRef("s:train:0", "sampler_weights", "000001")
    store.save(sampler, adapter, {"base_model": "m", "ttl_seconds": 60, "user_metadata": {"k": "v"}})
    listed = {c["checkpoint_id"]: c for c in store.list("s:train:0")}
    assert set(listed) == {"weights/000001", "sampler_weights/000001"}
    assert listed["weights/000001"]["checkpoint_type"] == "training"
    assert listed["sampler_weights/000001"]["checkpoint_type"] == "sampler"
    assert listed["sampler_weights/000001"]["user_metadata"] == {"k": "v"}
    assert "expires_at" in listed["sampler_weights/000001"]
    assert listed["weights/000001"]["size_bytes"] > 0

    assert store.delete(ref) is True
    assert store.delete(ref) is False
    with pytest.raises(WireError, match="not found"):
        store.load(ref, with_optimizer=False)
    assert [c["checkpoint_id"] for c in store.list("s:train:0")] == ["sampler_weights/000001"]


def test_a_failed_save_leaves_neither_a_partial_checkpoint_nor_staging_files(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path)
    ref = CheckpointRef("run", "weights", "keep")
    store.save(ref, {"w": torch.ones(2)}, {"step": 1}, optimizer={"state": {}, "param_groups": []})

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("posttrain.engine.checkpoints.torch.save", boom)
    with pytest.raises(OSError, match="disk full"):
        store.save(ref, {"w": torch.zeros(2)}, {"step": 2}, optimizer={"state": {}}, overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        store.save(CheckpointRef("run", "weights", "new"), {"w": torch.zeros(2)}, {}, optimizer={})
    # The old checkpoint is intact, the new one does not exist, and no staging directory is left behind.
    weights, meta, _ = store.load(ref, with_optimizer=True)
    assert meta["step"] == 1 and torch.equal(weights["w"], torch.ones(2))
    assert not store.exists(CheckpointRef("run", "weights", "new"))
    assert sorted(os.listdir(tmp_path / "run" / "weights")) == ["keep"]


@pytest.mark.parametrize(
    ("damage", "file", "why"),
    [
        ("truncate", "adapter.safetensors", "differ from what was saved"),
        ("flip", "optimizer.pt", "differ from what was saved"),
        ("truncate", "meta.json", ""),
    ],
)
def test_a_damaged_checkpoint_is_refused_by_name(tmp_path, damage: str, file: str, why: str):
    store = CheckpointStore(tmp_path)
    ref = CheckpointRef("run", "weights", "000005")
    store.save(ref, {"w": torch.arange(64.0)}, {"step": 5}, optimizer={"state": {}, "param_groups": []})
    path = tmp_path / "run" / "weights" / "000005" / file
    data = path.read_bytes()
    path.write_bytes(
        data[: len(data) // 2] if damage == "truncate" else data[:-9] + bytes([data[-9] ^ 1]) + data[-8:]
    )
    with pytest.raises(WireError) as caught:
        store.load(ref, with_optimizer=True)
    message = str(caught.value)
    assert (
        message.startswith(f"checkpoint tinker://run/weights/000005 is damaged: {path}: ") and why in message
    )


# ----------------------------------------------------------------------------------------------------------
# Scheduling helpers


def test_micro_batches_pack_every_datum_once_into_few_repeating_shapes():
    lengths = [5, 300, 17, 4096, 1, 64, 64, 900, 2, 200, 250, 7]
    batches = micro_batches(lengths, budget=1024)
    packed = [i for b in batches for pack in b.packs for i in pack]
    assert sorted(packed) == list(range(len(lengths)))
    widths = {b.width for b in batches}
    assert widths == {4096}  # one width per request: here the longest datum rounded up to PACK_TOKENS
    for batch in batches:
        for pack in batch.packs:
            assert sum(lengths[i] for i in pack) <= batch.width
    # Short datums share packs, at the width of the few that pads least (556 tokens: 3 packs of 192, where 256
    # would take 3 of 256); every micro-batch but the last holds budget // width packs (at least one).
    short = [60, 75, 31, 44, 58, 70, 66, 39, 52, 61]
    batches = micro_batches(short, budget=1024)
    assert [b.width for b in batches] == [192]
    assert len(batches[0].packs) == 3 and sum(len(p) for p in batches[0].packs) == len(short)
    # 32 datums of 48 tokens: 8 full packs of 192 (256 would need 7, the last holding only 96 tokens).
    batches = micro_batches([48] * 32, budget=512)
    assert {b.width for b in batches} == {192} and [len(b.packs) for b in batches] == [2, 2, 2, 2]
    assert all(len(pack) == 4 for b in batches for pack in b.packs)
    assert [len(b.packs) for b in micro_batches([250] * 5, budget=512)] == [2, 2, 1]
    # Datums longer than a pack: the narrowest multiple of 64 that pads least, not the next multiple of 256
    # (7 rollouts of 284 tokens: 7 packs of 320, where 512 computed 1.6x the tokens).
    assert {b.width for b in micro_batches([284] * 7, budget=512)} == {320}
    # ... unless a wider one pads less: two of 300 and two of 200 share two packs of 512 (1,024 tokens), where
    # 320 would take four packs (1,280).
    assert {b.width for b in micro_batches([300, 300, 200, 200], budget=512)} == {512}
    # Without packing (a model that cannot keep packed datums apart): one datum per sequence, the longest
    # rounded up to a multiple of 16.
    batches = micro_batches(short, budget=512, pack=False)
    assert {b.width for b in batches} == {80}
    assert all(len(pack) == 1 for b in batches for pack in b.packs)
    assert [len(b.packs) for b in batches] == [6, 4]


def test_thread_counts_follow_other_processes_demand():
    from posttrain.engine.threads import CpuTimes, others_demand, threads_for

    # Not saturated: the others got what they wanted (0.5 of 2 cores while we used 1).
    assert others_demand(CpuTimes(0, 0, 0), CpuTimes(10, 15, 10), 1, 2) == 0.5
    # Saturated, 2 of our threads and 1 busy process: it got 2/3 of a core; its demand is one thread.
    got = others_demand(CpuTimes(0, 0, 0), CpuTimes(3, 6, 4), 2, 2)
    assert got is not None and abs(got - 1.0) < 1e-9
    # Saturated with two busy processes beside our one thread: each got 2/3 of a core.
    got = others_demand(CpuTimes(0, 0, 0), CpuTimes(3, 6, 2), 1, 2)
    assert got is not None and abs(got - 2.0) < 1e-9
    assert others_demand(CpuTimes(0, 0, 0), CpuTimes(0.2, 0.4, 0.2), 2, 2) is None  # too short to tell
    assert threads_for(0.0, 2) == 2
    assert threads_for(1.0, 2) == 2  # one competing thread is tolerated
    assert threads_for(1.3, 2) == 1
    assert threads_for(3.0, 8) == 6
    assert threads_for(40.0, 8) == 1


def test_thread_policy_measures_real_competing_processes():
    import subprocess
    import sys
    import time

    from posttrain.engine.threads import ThreadPolicy, available_cpus

    cpus = available_cpus()
    policy = ThreadPolicy(cpus)
    assert policy.before_job() == cpus  # nothing measured yet: every processor
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cpus + 1)]
    try:
        time.sleep(0.3)  # let them start
        policy.before_job()
        time.sleep(1.5)  # our "job" uses no CPU, so the hogs have every processor
        policy.after_job()
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert policy.demand is not None and policy.demand > cpus - 0.5
    assert policy.before_job() == 1  # every processor taken: one competing thread tolerated, no more


def test_the_engine_process_spins_briefly_then_sleeps():
    import subprocess
    import sys

    code = (
        "import posttrain.engine.serve, os; "
        "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["PASSIVE", "1000"]
    # A user's own OpenMP setting is kept as it is.
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["ACTIVE", "None"]


def test_session_seed_tags_derive_stable_seeds_per_request():
    from posttrain.engine.seeding import SampleSeeds, derive, session_seed, split_session

    assert session_seed(["posttrain", "seed=7"]) == 7 and session_seed(["seed=1", "seed=3"]) == 3
    assert session_seed(["seed=x", "seedy=4", 5]) is None and session_seed([]) is None
    assert derive(7, "lora", 0) == derive(7, "lora", 0) != derive(7, "lora", 1) != derive(8, "lora", 1)
    assert 0 <= derive(7, "lora", 0) < 2**63
    # The session's random id is not part of a seed: the same request order in another session, the same seeds.
    assert split_session("s1a2:train:0:sampler:5") == ("s1a2", "train:0:sampler:5")
    first, second = SampleSeeds(), SampleSeeds()
    a = [first.seed_for(7, "sA:sample:1", (p, None)) for p in ((1, 2), (3,), (1, 2))]
    # another arrival order
    b = [second.seed_for(7, "sB:sample:1", (p, None)) for p in ((3,), (1, 2), (1, 2))]
    assert a[0] != a[2] and sorted(a) == sorted(b) and a[1] == b[0]
    second.forget_session("sB")
    assert second.seed_for(7, "sB:sample:1", ((1, 2), None)) == a[0]  # a finished session's counts are gone


def test_the_engines_thread_count_is_fixed_and_can_come_from_the_environment(monkeypatch):
    from posttrain.engine import serve

    monkeypatch.setenv(serve.THREADS_VARIABLE, "3")
    assert serve.build_parser().parse_args([]).threads == 3
    monkeypatch.delenv(serve.THREADS_VARIABLE)
    # every processor, fixed (compute.ComputeThread)
    assert serve.build_parser().parse_args([]).threads is None
    assert serve.build_parser().parse_args(["--threads", "0"]).threads == 0  # the adaptive policy, on request
