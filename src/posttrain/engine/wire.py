"""Protobuf and JSON encodings of the Tinker wire protocol (the `tinker_public` schema the SDK ships).

Every request body is read here: routes get typed requests, and the engine never sees raw JSON.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import zstandard
from tinker.proto import tinker_public_pb2 as pb

from posttrain.engine.errors import WireError
from posttrain.engine.sampling import GenerationRequest, SamplingSpec
from posttrain.engine.vision import ImageInput, Part, VisionInputs, has_images, image_input, input_length

MAX_SAMPLE_TOKENS = 4096


class ServingModel(Protocol):
    """What a sampling request is checked against: the model that will serve it (the runtime's `ServedModel`)."""

    name: str
    max_context: int

    def check_tokens(self, tokens: list[int], where: str) -> None: ...

    def lay_out(self, parts: list[Part], where: str) -> tuple[list[int], VisionInputs | None]: ...


_NUMPY_OF = {
    pb.DTYPE_FLOAT32: np.float32,
    pb.DTYPE_INT64: np.int64,
    pb.DTYPE_INT32: np.int32,
}


def sequence_id(request_id: str, index: int) -> str:
    """The id of sample `index` of a sampling request (`sample_sequence_ids`; provenance spans name it)."""
    return f"{request_id}:{index}"


@dataclass(frozen=True)
class ProvenanceSpan:
    """`length` consecutive positions that are positions offset.. of a sampled sequence's prompt or tokens."""

    kind: str  # "prompt" or "sampled"
    sequence_id: str
    offset: int
    length: int


@dataclass
class FwdBwdDatum:
    tokens: list[int]  # with images: empty until the serving model lays the input out (`parts`)
    inputs: dict[str, torch.Tensor]  # dense tensors with their declared shapes
    # Where each target token came from (Datum.loss_fn_input_spans), tiling target_tokens; None: not given.
    target_spans: list[ProvenanceSpan] | None = None
    parts: list[Part] | None = None  # the model input as token runs and images, when it holds images
    vision: VisionInputs | None = None  # set with `tokens` when the parts are laid out


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


def forward_backward_request(body: bytes, content_type: str, content_encoding: str | None) -> FwdBwdRequest:
    """A forward_backward (or forward: the SDK >= 0.25 sends it as forward_only) request body."""
    if "protobuf" not in content_type:
        raise WireError("forward_backward: expected an application/x-protobuf body (tinker SDK >= 0.25)")
    return decode_forward_backward(body, content_encoding)


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
        where = f"datum {i} model_input chunk"
        parts = [_proto_part(chunk, f"{where} {k}") for k, chunk in enumerate(datum.model_input)]
        inputs = {name: _tensor_from_proto(name, t) for name, t in datum.loss_fn_inputs.items()}
        spans = _spans(datum.loss_fn_input_spans, i, "loss_fn_input_spans")
        length = input_length(parts)
        if length is not None:  # an image without expected_tokens: its length is known once laid out
            _check_tiling(_spans(datum.model_input_spans, i, "model_input_spans"), length, i, "model_input")
        target = inputs.get("target_tokens")
        if target is not None and target.dim() == 1:
            _check_tiling(spans, target.shape[0], i, "target_tokens")
        if has_images(parts):
            request.data.append(FwdBwdDatum(tokens=[], inputs=inputs, target_spans=spans, parts=parts))
        else:
            tokens = [t for p in parts if not isinstance(p, ImageInput) for t in p]
            request.data.append(FwdBwdDatum(tokens=tokens, inputs=inputs, target_spans=spans))
    return request


def _proto_part(chunk: pb.Chunk, where: str) -> Part:
    kind = chunk.WhichOneof("chunk")
    if kind == "encoded_text":
        return np.frombuffer(chunk.encoded_text.tokens, dtype=np.int32).tolist()
    if kind == "image":
        image = chunk.image
        expected = int(image.expected_tokens) if image.HasField("expected_tokens") else None
        return image_input(image.data, image.format, expected, where)
    raise WireError(f"{where}: {kind} chunks are not supported by the local engine (text and image only)")


def _spans(messages: Any, index: int, field_name: str) -> list[ProvenanceSpan] | None:
    spans = []
    for message in messages:
        kind = message.WhichOneof("span")
        arm = message.prompt_tokens if kind == "prompt_tokens" else message.sampled_tokens
        if kind is None or not arm.sequence_id or arm.offset < 0 or arm.length < 0:
            raise WireError(f"datum {index}: {field_name} has a malformed span ({kind}, {arm.sequence_id!r})")
        spans.append(ProvenanceSpan(kind.split("_")[0], arm.sequence_id, int(arm.offset), int(arm.length)))
    return spans or None


def _check_tiling(spans: list[ProvenanceSpan] | None, expected: int, index: int, field_name: str) -> None:
    if spans is not None and sum(s.length for s in spans) != expected:
        raise WireError(
            f"datum {index}: the provenance spans of {field_name} cover {sum(s.length for s in spans)} "
            f"positions, not its {expected}"
        )


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


def parts_from_model_input(model_input: dict, where: str = "prompt") -> list[Part]:
    """The JSON `ModelInput` of a sampling request as token runs and images (text and image chunks)."""
    parts: list[Part] = []
    for k, chunk in enumerate(model_input.get("chunks", [])):
        kind = chunk.get("type", "encoded_text")
        if kind == "encoded_text":
            parts.append([int(t) for t in chunk.get("tokens", [])])
        elif kind == "image":
            parts.append(_json_image(chunk, f"{where} chunk {k}"))
        else:
            raise WireError(
                f"{where} chunk {k}: {kind} chunks are not supported by the local engine (text and image only)"
            )
    return parts


def _json_image(chunk: dict, where: str) -> ImageInput:
    try:
        data = base64.b64decode(str(chunk.get("data", "")), validate=True)
    except (binascii.Error, ValueError):
        raise WireError(f"{where}: image data is not base64") from None
    expected = chunk.get("expected_tokens")
    if expected is not None and not isinstance(expected, int):
        raise WireError(f"{where}: expected_tokens must be an integer, got {expected!r}")
    return image_input(data, str(chunk.get("format")), expected, where)


def tokens_from_model_input(model_input: dict) -> list[int]:
    """Flatten the JSON `ModelInput` of a text-only sampling request (image chunks refused)."""
    parts = parts_from_model_input(model_input)
    if has_images(parts):
        raise WireError("prompt: image chunks are not supported in a text-only prompt")
    return [t for p in parts if not isinstance(p, ImageInput) for t in p]


# JSON requests ---------------------------------------------------------------------------------------------
# Reading a request only checks its shape. What needs the engine (is this model id known? is this checkpoint
# path valid?) stays in the route, in the order it always ran, so a request with several faults is still
# told about the same one.


def json_object(body: bytes, where: str) -> dict:
    """The body of a JSON request, which must be an object; `where` (the request path) names it in errors."""
    try:
        data = json.loads(body)
    except ValueError:
        raise WireError(f"{where}: body is not JSON") from None
    if not isinstance(data, dict):
        raise WireError(f"{where}: body must be a JSON object")
    return data


def training_model_id(session_id: Any, model_seq_id: Any) -> str:
    """The id of a session's training client: the SDK derives it itself for create-from-state."""
    return f"{session_id}:train:{model_seq_id}"


@dataclass(frozen=True)
class CreateModelRequest:
    session_id: Any
    model_seq_id: Any
    base_model: str | None
    lora_config: dict
    user_metadata: dict | None

    @property
    def model_id(self) -> str:
        return training_model_id(self.session_id, self.model_seq_id)

    @classmethod
    def from_json(cls, data: dict) -> CreateModelRequest:
        lora = data.get("lora_config") or {}
        if "rank" not in lora:
            raise WireError("create_model: lora_config.rank is required")
        return cls(
            session_id=data.get("session_id", ""),
            model_seq_id=data.get("model_seq_id", 0),
            base_model=data.get("base_model"),
            lora_config=lora,
            user_metadata=data.get("user_metadata"),
        )


@dataclass(frozen=True)
class OptimStepRequest:
    model_id: str
    seq_id: Any
    optimizer: str | None  # "adam" when the request sends adam_params (the only optimizer there is)
    adam_params: Any

    @classmethod
    def from_json(cls, data: dict) -> OptimStepRequest:
        return cls(
            model_id=data.get("model_id", ""),
            seq_id=data.get("seq_id"),
            optimizer="adam" if "adam_params" in data else None,
            adam_params=data.get("adam_params"),
        )


@dataclass(frozen=True)
class SaveWeightsRequest:
    """save_weights (training state, `path` required) and save_weights_for_sampler (`path` optional)."""

    model_id: str
    seq_id: Any
    path: Any
    ttl_seconds: int | None
    overwrite: bool
    user_metadata: dict | None
    sampling_session_seq_id: int | None

    @classmethod
    def from_json(cls, data: dict) -> SaveWeightsRequest:
        return cls(
            model_id=data.get("model_id", ""),
            seq_id=data.get("seq_id"),
            path=data.get("path"),
            ttl_seconds=data.get("ttl_seconds"),
            overwrite=bool(data.get("overwrite")),
            user_metadata=data.get("user_metadata"),
            sampling_session_seq_id=data.get("sampling_session_seq_id"),
        )


@dataclass(frozen=True)
class LoadWeightsRequest:
    path: str
    model_id: str | None  # None: create the training client from the checkpoint (create-from-state)
    seq_id: Any
    session_id: Any
    model_seq_id: Any
    optimizer: bool
    base_model: str | None
    user_metadata: dict | None

    @classmethod
    def from_json(cls, data: dict) -> LoadWeightsRequest:
        return cls(
            path=str(data.get("path") or ""),
            model_id=data.get("model_id") or None,
            seq_id=data.get("seq_id"),
            session_id=data.get("session_id", ""),
            model_seq_id=data.get("model_seq_id", 0),
            optimizer=bool(data.get("optimizer")),
            base_model=data.get("base_model"),
            user_metadata=data.get("user_metadata"),
        )


@dataclass(frozen=True)
class SamplerRequest:
    """create_sampling_session, and the part of asample that says which weights to sample from."""

    session_id: Any
    sampling_session_seq_id: Any
    sampling_session_id: str | None
    base_model: str | None
    model_path: str | None

    @property
    def new_sampler_id(self) -> str:
        return f"{self.session_id}:sample:{self.sampling_session_seq_id}"

    @property
    def adhoc_sampler_id(self) -> str:
        return f"adhoc:{self.base_model}:{self.model_path}"

    @classmethod
    def from_json(cls, data: dict) -> SamplerRequest:
        return cls(
            session_id=data.get("session_id", ""),
            sampling_session_seq_id=data.get("sampling_session_seq_id", 0),
            sampling_session_id=data.get("sampling_session_id"),
            base_model=data.get("base_model"),
            model_path=data.get("model_path"),
        )


@dataclass(frozen=True)
class SampleRequest:
    weights: SamplerRequest
    seq_id: Any  # None: the request cannot be recognised as a retry
    num_samples: Any
    body: dict  # the prompt and sampling settings: `generation` reads them once the serving model is known

    @classmethod
    def from_json(cls, data: dict) -> SampleRequest:
        return cls(SamplerRequest.from_json(data), data.get("seq_id"), data.get("num_samples"), data)

    def failed_sequence_ids(self) -> list[str]:
        """The sequence ids of the reply when the request itself failed."""
        return [f"failed:{i}" for i in range(int(self.num_samples or 1))]

    def generation(self, model: ServingModel) -> GenerationRequest:
        """The prompt and sampling settings, checked against the model that will serve them.

        Checked here, per request: an invalid request reaching the sampler would fail its whole batch.
        """
        data = self.body
        prompt, vision = model.lay_out(parts_from_model_input(data.get("prompt") or {}), "prompt")
        model.check_tokens(prompt, "prompt")
        params = data.get("sampling_params") or {}
        stop = params.get("stop")
        stop_strings: list[str] = []
        stop_tokens: list[int] | None = None
        if isinstance(stop, str):
            stop_strings = [stop]
        elif isinstance(stop, list) and stop and all(isinstance(s, str) for s in stop):
            stop_strings = list(stop)
        elif isinstance(stop, list):
            stop_tokens = [int(s) for s in stop]  # [] disables every stop, EOS included
            model.check_tokens(stop_tokens or [0], "sampling_params.stop")
        max_tokens = params.get("max_tokens")
        if max_tokens is not None and (int(max_tokens) < 1):
            raise WireError(f"sampling_params.max_tokens must be >= 1, got {max_tokens}")
        temperature = float(params.get("temperature", 1.0))
        if not (math.isfinite(temperature) and temperature >= 0):
            raise WireError(f"sampling_params.temperature must be a finite number >= 0, got {temperature}")
        top_p = float(params.get("top_p", 1.0))
        if not 0 < top_p <= 1:
            raise WireError(f"sampling_params.top_p must be in (0, 1], got {top_p}")
        seed = params.get("seed")
        if seed is not None and not isinstance(seed, int):
            raise WireError(f"sampling_params.seed must be an integer, got {seed!r}")
        if len(prompt) >= model.max_context:
            raise WireError(
                f"prompt has {len(prompt)} tokens; the context length of {model.name} is {model.max_context}"
            )
        num_samples = int(data.get("num_samples", 1))
        if num_samples < 1 or num_samples > 1024:
            raise WireError(f"num_samples must be between 1 and 1024, got {num_samples}")
        for unsupported in ("topk_prompt_logprobs", "topk_sample_logprobs", "prompt_alt_tokens_k"):
            if int(data.get(unsupported) or 0) > 0:
                raise WireError(f"{unsupported} is not supported by the local engine")
        spec = SamplingSpec(
            max_tokens=min(int(max_tokens), MAX_SAMPLE_TOKENS) if max_tokens is not None else None,
            temperature=temperature,
            top_p=top_p,
            top_k=int(params.get("top_k", -1)),
            seed=seed,
            stop_strings=stop_strings,
            stop_token_ids=stop_tokens,
        )
        return GenerationRequest(
            prompt_tokens=prompt,
            num_samples=num_samples,
            spec=spec,
            prompt_logprobs=bool(data.get("prompt_logprobs", False)),
            record_stability=bool(data.get("record_stability_info", False)),
            vision=vision,
        )
