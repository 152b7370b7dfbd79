"""Protobuf and JSON encodings of the Tinker wire protocol (the `tinker_public` schema the SDK ships)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import zstandard
from tinker.proto import tinker_public_pb2 as pb

_NUMPY_OF = {
    pb.DTYPE_FLOAT32: np.float32,
    pb.DTYPE_INT64: np.int64,
    pb.DTYPE_INT32: np.int32,
}


class WireError(ValueError):
    """A request the engine cannot decode; becomes a failed future or a 400 with the message."""


@dataclass
class FwdBwdDatum:
    tokens: list[int]
    inputs: dict[str, torch.Tensor]  # dense tensors with their declared shapes


@dataclass
class FwdBwdRequest:
    model_id: str
    seq_id: int
    loss_fn: str
    loss_fn_config: dict[str, float | str] = field(default_factory=dict)
    forward_only: bool = False
    data: list[FwdBwdDatum] = field(default_factory=list)


def _buffer(name: str, data: bytes, dtype: type) -> np.ndarray:
    try:
        return np.frombuffer(data, dtype=dtype)
    except ValueError:
        raise WireError(
            f"loss_fn_inputs[{name!r}]: {len(data)} bytes is not a whole number of {dtype.__name__}"
        ) from None


def _tensor_from_proto(name: str, msg: pb.Tensor) -> torch.Tensor:
    dtype = _NUMPY_OF.get(msg.dtype)
    if dtype is None:
        raise WireError(f"loss_fn_inputs[{name!r}]: unsupported dtype {msg.dtype}")
    shape = [int(s) for s in msg.shape]
    if msg.HasField("sparse_csr"):
        if len(shape) != 2 or min(shape) < 0:
            raise WireError(f"loss_fn_inputs[{name!r}]: a sparse tensor needs a 2-D shape, got {shape}")
        values = _buffer(name, msg.sparse_csr.values, dtype)
        crow = _buffer(name, msg.sparse_csr.crow_indices, np.int64)
        col = _buffer(name, msg.sparse_csr.col_indices, np.int64)
        # Checked by hand: the bytes come from the network, and torch's sparse constructors skip these checks.
        counts = np.diff(crow)
        if (
            len(crow) != shape[0] + 1
            or len(col) != len(values)
            or crow[0] != 0
            or crow[-1] != len(values)
            or (counts < 0).any()
            or (len(col) and (col.min() < 0 or col.max() >= shape[1]))
        ):
            raise WireError(f"loss_fn_inputs[{name!r}]: inconsistent sparse CSR indices for shape {shape}")
        dense = np.zeros(shape, dtype=dtype)
        dense[np.repeat(np.arange(shape[0]), counts), col] = values
        return torch.from_numpy(dense)
    flat = torch.from_numpy(_buffer(name, msg.dense, dtype).copy())
    if not shape:
        return flat
    if math.prod(shape) != flat.numel():
        raise WireError(f"loss_fn_inputs[{name!r}]: shape {shape} does not match {flat.numel()} values")
    return flat.reshape(shape)


def decode_forward_backward(body: bytes, content_encoding: str | None) -> FwdBwdRequest:
    if content_encoding and "zstd" in content_encoding:
        body = zstandard.ZstdDecompressor().decompressobj().decompress(body)
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError and others
        raise WireError(f"forward_backward: body is not a ForwardBackwardRequest protobuf ({exc})") from None
    config: dict[str, float | str] = {k: float(v) for k, v in msg.loss_fn_config.items()}
    for key, value in msg.loss_fn_config_v2.items():
        config[key] = value.text if value.WhichOneof("value") == "text" else float(value.number)
    request = FwdBwdRequest(
        model_id=msg.model_id,
        seq_id=int(msg.seq_id),
        loss_fn=msg.loss_fn,
        loss_fn_config=config,
        forward_only=bool(msg.forward_only),
    )
    for i, datum in enumerate(msg.data):
        tokens: list[int] = []
        for chunk in datum.model_input:
            kind = chunk.WhichOneof("chunk")
            if kind != "encoded_text":
                raise WireError(f"datum {i}: {kind} chunks are not supported by the local engine (text only)")
            tokens.extend(np.frombuffer(chunk.encoded_text.tokens, dtype=np.int32).tolist())
        inputs = {name: _tensor_from_proto(name, t) for name, t in datum.loss_fn_inputs.items()}
        request.data.append(FwdBwdDatum(tokens=tokens, inputs=inputs))
    return request


def _batched(arrays: list[np.ndarray], dtype: np.dtype, proto_dtype: int) -> pb.BatchedTensor:
    trailing = list(arrays[0].shape[1:]) if arrays else []
    flat = [np.ascontiguousarray(a, dtype=dtype).reshape(-1) for a in arrays]
    offsets = np.zeros(len(flat) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([a.nbytes for a in flat])
    data = b"".join(a.tobytes() for a in flat)
    return pb.BatchedTensor(data=data, offsets=offsets.tobytes(), dtype=proto_dtype, trailing_shape=trailing)


def encode_forward_backward_output(outputs: list[dict[str, np.ndarray]], metrics: dict[str, float]) -> bytes:
    msg = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
    # One ArrayRecord per run of consecutive datums whose fields share trailing shapes (e.g. [N] targets next to
    # [N, K] ones): a BatchedTensor has a single trailing shape, and the SDK concatenates the records in order.
    start = 0
    while start < len(outputs):
        shapes = {name: a.shape[1:] for name, a in outputs[start].items()}
        stop = start + 1
        while stop < len(outputs) and {n: a.shape[1:] for n, a in outputs[stop].items()} == shapes:
            stop += 1
        record = msg.loss_fn_outputs.add()
        record.num_datums = stop - start
        for name in shapes:
            record.fields[name].CopyFrom(
                _batched([o[name] for o in outputs[start:stop]], np.dtype(np.float32), pb.DTYPE_FLOAT32)
            )
        start = stop
    for key, value in metrics.items():
        msg.metrics[key] = float(value)
    return msg.SerializeToString()


def encode_sample_response(
    sequences: list[tuple[list[int], list[float], str]], prompt_logprobs: list[float] | None
) -> bytes:
    msg = pb.SampleResponse()
    for tokens, logprobs, stop_reason in sequences:
        seq = msg.sequences.add()
        seq.stop_reason = pb.STOP_REASON_STOP if stop_reason == "stop" else pb.STOP_REASON_LENGTH
        seq.tokens = np.asarray(tokens, dtype=np.int32).tobytes()
        seq.logprobs = np.asarray(logprobs, dtype=np.float32).tobytes()
    if prompt_logprobs is not None:
        msg.prompt_logprobs = np.asarray(prompt_logprobs, dtype=np.float32).tobytes()
    return msg.SerializeToString()


def tokens_from_model_input(model_input: dict) -> list[int]:
    """Flatten the JSON `ModelInput` of a sampling request; only text chunks are supported."""
    tokens: list[int] = []
    for chunk in model_input.get("chunks", []):
        kind = chunk.get("type", "encoded_text")
        if kind != "encoded_text":
            raise WireError(f"prompt: {kind} chunks are not supported by the local engine (text only)")
        tokens.extend(int(t) for t in chunk.get("tokens", []))
    return tokens
