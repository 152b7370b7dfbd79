"""Image chunks end to end: the unmodified tinker SDK against the local engine serving a tiny Qwen3-VL stand-in
under its lineup name, with datums and prompts built by the cookbook's own Qwen3-VL renderer and image processor.

The images are solid 64x64 squares; the real Qwen3-VL processor scales them up to its minimum of 256x256 pixels,
so each is 64 image tokens.
"""

from __future__ import annotations

import base64
import contextlib
import io
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tinker
from tinker import types

from posttrain.engine.vision import image_input

NAME = "Qwen/Qwen3-VL-30B-A3B-Instruct"
RED, BLUE = (220, 20, 20), (20, 20, 220)
IMAGE_TOKENS = 64  # a 64x64 image: resized to 256x256, 16-pixel patches, 2x2 merged


@contextlib.contextmanager
def hub_cache(path: Path) -> Iterator[None]:
    """HF_HUB_CACHE for this process: huggingface_hub reads it once at import, so its constant is set too."""
    from huggingface_hub import constants

    previous_env, previous = os.environ.get("HF_HUB_CACHE"), constants.HF_HUB_CACHE
    os.environ["HF_HUB_CACHE"] = constants.HF_HUB_CACHE = str(path)
    try:
        yield
    finally:
        constants.HF_HUB_CACHE = previous
        if previous_env is None:
            os.environ.pop("HF_HUB_CACHE", None)
        else:
            os.environ["HF_HUB_CACHE"] = previous_env


@pytest.fixture(scope="module")
def renderer(vision_hub_cache: Path) -> Any:
    """The cookbook's recommended renderer for the lineup name, with the image processor it resolves offline."""
    from tinker_cookbook import model_info, renderers
    from tinker_cookbook.image_processing_utils import get_image_processor
    from tinker_cookbook.tokenizer_utils import get_tokenizer

    name = model_info.get_recommended_renderer_name(NAME)
    assert name == "qwen3_vl_instruct"
    with hub_cache(vision_hub_cache):
        processor = get_image_processor(NAME)
        tokenizer = get_tokenizer(NAME)
    return renderers.get_renderer(name, tokenizer, image_processor=processor)


@pytest.fixture
def service(vision_engine: Any, services: Any) -> Any:
    return services(base_url=vision_engine.url, api_key="tml-local-test")


def square(colour: tuple[int, int, int]) -> Any:
    from PIL import Image

    return Image.new("RGB", (64, 64), colour)


def question(image: Any) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": "What colour?"}],
        }
    ]


def datum(renderer: Any, image: Any, answer: str) -> types.Datum:
    from tinker_cookbook.renderers import TrainOnWhat
    from tinker_cookbook.supervised.data import conversation_to_datum

    conversation = [*question(image), {"role": "assistant", "content": answer}]
    return conversation_to_datum(conversation, renderer, None, TrainOnWhat.LAST_ASSISTANT_MESSAGE)


def answer_logprob(out: types.ForwardBackwardOutput, data: list[types.Datum]) -> list[float]:
    """Each datum's summed log-prob of its trained (assistant) tokens."""
    sums = []
    for output, d in zip(out.loss_fn_outputs, data, strict=True):
        weights = np.asarray(d.loss_fn_inputs["weights"].data) > 0
        sums.append(float(output["logprobs"].to_numpy()[weights].sum()))
    return sums


def image_chunk(data: bytes, fmt: str = "png", expected: int | None = IMAGE_TOKENS) -> types.ImageChunk:
    if fmt in ("png", "jpeg"):
        return types.ImageChunk(data=data, format=fmt, expected_tokens=expected)
    # The SDK refuses other formats itself; model_construct sends one anyway, to see the engine refuse it.
    return types.ImageChunk.model_construct(data=data, format=fmt, expected_tokens=expected, type="image")


def png_bytes(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    square(colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_stand_in_resolves_like_the_lineup_model(renderer: Any):
    """The cookbook's image processor for the lineup name is the real Qwen3-VL one, and its renderer lays an
    image out as <|vision_start|> + an ImageChunk of 64 tokens + <|vision_end|>."""
    processor = renderer.image_processor
    assert (processor.patch_size, processor.temporal_patch_size, processor.merge_size) == (16, 2, 2)
    assert processor.size == {"shortest_edge": 65536, "longest_edge": 16777216}
    prompt = renderer.build_generation_prompt(question(square(RED)))
    images = [c for c in prompt.chunks if isinstance(c, types.ImageChunk)]
    assert len(images) == 1 and images[0].expected_tokens == IMAGE_TOKENS
    text_tokens = [t for c in prompt.chunks if isinstance(c, types.EncodedTextChunk) for t in c.tokens]
    text = renderer.tokenizer.decode(text_tokens)
    assert "<|vision_start|><|vision_end|>" in text


def test_forward_backward_and_compute_logprobs_with_images(service: Any, renderer: Any):
    tc = service.create_lora_training_client(base_model=NAME, rank=8, seed=0).result()
    data = [datum(renderer, square(RED), "Red"), datum(renderer, square(BLUE), "Blue")]
    out = tc.forward_backward(data, "cross_entropy").result()
    for output, d in zip(out.loss_fn_outputs, data, strict=True):
        logprobs = output["logprobs"].to_numpy()
        assert logprobs.shape == (d.model_input.length,)  # one per position, the 64 image positions included
        assert np.isfinite(logprobs).all() and np.isfinite(output["elementwise_loss"].to_numpy()).all()
    assert math.isfinite(out.metrics["loss:sum"])

    # compute_logprobs (the sampler's prefill) agrees with forward (the training path) on every text target.
    sampler = service.create_sampling_client(base_model=NAME).result()
    full, _ = renderer.build_supervised_example(
        [*question(square(RED)), {"role": "assistant", "content": "Red"}]
    )
    scored = sampler.compute_logprobs(full).result()
    assert len(scored) == full.length
    forward = tc.forward([data[0]], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    image_at = _image_positions(full)
    text_targets = [i for i in range(full.length - 1) if i + 1 not in image_at]
    assert len(text_targets) > 10
    np.testing.assert_allclose(
        forward[text_targets], np.array([scored[i + 1] for i in text_targets]), atol=2e-4
    )

    # The image reaches the model: the same text after another image scores differently.
    swapped = datum(renderer, square(BLUE), "Red")
    other = tc.forward([swapped], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    after_image = max(image_at) + 1
    assert np.abs(other[after_image:] - forward[after_image:]).max() > 1e-3


def _image_positions(model_input: types.ModelInput) -> set[int]:
    positions, start = set(), 0
    for chunk in model_input.chunks:
        if isinstance(chunk, types.ImageChunk):
            positions.update(range(start, start + chunk.length))
        start += chunk.length
    return positions


def test_training_on_images_learns_which_label_goes_with_which_image(service: Any, renderer: Any):
    """A few steps on red -> "Red", blue -> "Blue" make each image prefer its own label: the image reaches the
    model and the gradient. Then greedy samples from the saved sampler checkpoint (a tinker:// path, as the
    pipeline evaluates) agree with forward.

    LoRA on attention only: the stand-in's random 64-wide model has near-uniform logits (tied embeddings of scale
    0.02), which attention moves by a nat or so; with the unembedding trained too, Adam's steps on 150k rows of
    tiny gradients make the per-image preference swing from step to step (measured over three seeds).
    """
    tc = service.create_lora_training_client(base_model=NAME, rank=8, seed=1, train_unembed=False).result()
    train = [datum(renderer, square(RED), "Red"), datum(renderer, square(BLUE), "Blue")]
    crossed = [datum(renderer, square(RED), "Blue"), datum(renderer, square(BLUE), "Red")]
    for _ in range(12):
        tc.forward_backward(train, "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=0.05)).result()
    right = answer_logprob(tc.forward(train, "cross_entropy").result(), train)
    wrong = answer_logprob(tc.forward(crossed, "cross_entropy").result(), crossed)
    assert right[0] > wrong[0] + 0.1 and right[1] > wrong[1] + 0.1, (right, wrong)

    path = tc.save_weights_for_sampler("vision-final").result().path
    assert path.startswith("tinker://")
    sampler = service.create_sampling_client(model_path=path).result()
    params = types.SamplingParams(max_tokens=4, temperature=0.0, stop=[])
    for colour in (RED, BLUE):
        prompt = renderer.build_generation_prompt(question(square(colour)))
        sample = sampler.sample(prompt, num_samples=1, sampling_params=params).result().sequences[0]
        assert len(sample.tokens) == 4
        _check_against_forward(tc, prompt, sample)


def test_greedy_sampling_from_the_base_model_matches_forward(service: Any, renderer: Any):
    # LoRA B = 0: the base model
    tc = service.create_lora_training_client(base_model=NAME, rank=8, seed=2).result()
    sampler = service.create_sampling_client(base_model=NAME).result()
    params = types.SamplingParams(max_tokens=6, temperature=0.0, stop=[])
    prompt = renderer.build_generation_prompt(question(square(RED)))
    first = sampler.sample(prompt, num_samples=2, sampling_params=params).result().sequences
    assert first[0].tokens == first[1].tokens and len(first[0].tokens) == 6
    _check_against_forward(tc, prompt, first[0])
    # A prompt with the same tokens but another image is another prompt (not the cached prefill of the first).
    blue = renderer.build_generation_prompt(question(square(BLUE)))
    other = sampler.sample(blue, num_samples=1, sampling_params=params).result().sequences[0]
    assert other.logprobs != first[0].logprobs


def _check_against_forward(tc: Any, prompt: types.ModelInput, sample: types.SampledSequence) -> None:
    """The sampler's logprobs of its greedy tokens are forward's over prompt + completion, and each greedy token
    is forward's most likely among it and a spread of other candidates."""
    tokens = list(sample.tokens)
    model_input = prompt
    for token in tokens[:-1]:
        model_input = model_input.append_int(token)
    n = model_input.length
    targets = [0] * (prompt.length - 1) + tokens
    plain = types.Datum(model_input=model_input, loss_fn_inputs={"target_tokens": targets})
    lp = tc.forward([plain], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    np.testing.assert_allclose(lp[-len(tokens) :], sample.logprobs, atol=2e-4)
    # Top-K targets: the greedy token and 63 others at each sampled position.
    rng = np.random.default_rng(0)
    candidates = np.zeros((n, 64), dtype=np.int64)
    candidates[:, 1:] = rng.integers(0, 151000, size=(n, 63))
    candidates[:, 0] = targets
    topk = types.Datum(
        model_input=model_input,
        loss_fn_inputs={"target_tokens": candidates, "weights": np.ones((n, 64), dtype=np.float32)},
    )
    scores = tc.forward([topk], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    assert scores.shape == (n, 64)
    assert (scores[-len(tokens) :].argmax(axis=1) == 0).all()


# ------------------------------------------------------------------------------------------- refusals


# The gif chunk (model_construct) makes pydantic warn while the SDK serialises it.
@pytest.mark.filterwarnings("ignore:Pydantic serializer warnings:UserWarning")
def test_image_chunks_refused_one_line_each(service: Any, renderer: Any, tiny_model: str):
    sampler = service.create_sampling_client(base_model=NAME).result()
    prefix = renderer.tokenizer.encode("<|im_start|>user\n<|vision_start|>")
    suffix = renderer.tokenizer.encode("<|vision_end|>What colour?<|im_end|>\n<|im_start|>assistant\n")
    params = types.SamplingParams(max_tokens=2, temperature=0.0)

    def prompt(chunk: types.ImageChunk) -> types.ModelInput:
        return types.ModelInput(
            chunks=[types.EncodedTextChunk(tokens=prefix), chunk, types.EncodedTextChunk(tokens=suffix)]
        )

    cases = {
        "not an image": (
            image_chunk(b"certainly not a png"),
            r"prompt chunk 1: the image bytes could not be decoded as png",
        ),
        "wrong count": (
            image_chunk(png_bytes(RED), expected=5),
            r"prompt chunk 1: the image is 64 tokens .* expected_tokens is 5",
        ),
        "gif": (
            image_chunk(png_bytes(RED), fmt="gif"),
            r"prompt chunk 1: image format 'gif' is not supported \(png or jpeg\)",
        ),
    }
    for name, (chunk, match) in cases.items():
        with pytest.raises(tinker.RequestFailedError, match=match) as caught:
            sampler.sample(prompt(chunk), num_samples=1, sampling_params=params).result()
        assert "\n" not in str(caught.value).strip(), name

    # In training requests too (protobuf Chunk.image), naming the datum and chunk.
    tc = service.create_lora_training_client(base_model=NAME, rank=4, seed=3).result()
    bad = datum(renderer, square(RED), "Red")
    chunks = list(bad.model_input.chunks)
    at = next(i for i, c in enumerate(chunks) if isinstance(c, types.ImageChunk))
    chunks[at] = image_chunk(png_bytes(RED), expected=7)
    # The length must still match the targets' for the SDK: only expected_tokens is wrong, not the layout.
    mismatch = types.Datum(model_input=types.ModelInput(chunks=chunks), loss_fn_inputs=bad.loss_fn_inputs)
    with pytest.raises(
        tinker.RequestFailedError, match=rf"datum 0 model_input chunk {at}: the image is 64 tokens"
    ):
        tc.forward([mismatch], "cross_entropy").result()

    # A text-only model refuses images, in sampling and in training.
    text_sampler = service.create_sampling_client(base_model=tiny_model).result()
    text_only = "is text-only; image chunks need a vision-language model"
    with pytest.raises(tinker.RequestFailedError, match=f"prompt: .*{text_only}"):
        text_sampler.sample(
            prompt(image_chunk(png_bytes(RED))), num_samples=1, sampling_params=params
        ).result()
    text_tc = service.create_lora_training_client(base_model=tiny_model, rank=4, seed=3).result()
    image_datum = types.Datum(
        model_input=types.ModelInput(
            chunks=[types.EncodedTextChunk(tokens=[5, 6]), image_chunk(png_bytes(RED))]
        ),
        loss_fn_inputs={"target_tokens": [0] * (2 + IMAGE_TOKENS)},
    )
    with pytest.raises(tinker.RequestFailedError, match=f"datum 0 model_input: .*{text_only}"):
        text_tc.forward([image_datum], "cross_entropy").result()


def test_json_image_chunk_is_the_sdk_shape():
    """The JSON form a sampling prompt's image takes (base64 data), read back as the bytes sent."""
    from posttrain.engine.vision import ImageInput
    from posttrain.engine.wire import parts_from_model_input

    data = png_bytes(RED)
    model_input = types.ModelInput(
        chunks=[
            types.EncodedTextChunk(tokens=[1, 2]),
            types.ImageChunk(data=data, format="png", expected_tokens=64),
        ]
    )
    dumped = model_input.model_dump(mode="json")
    assert dumped["chunks"][1]["data"] == base64.b64encode(data).decode()
    parts = parts_from_model_input(dumped)
    assert parts[0] == [1, 2]
    assert isinstance(parts[1], ImageInput) and parts[1].data == data and parts[1].expected_tokens == 64


# ------------------------------------------------------------------- the batched sampler, in process


def test_batched_sampler_decodes_image_prompts_as_the_model_generates(vision_models: dict[str, Path]):
    """Rows after images continue at their own M-RoPE positions: in one batch with another image and a text-only
    prompt, each greedy completion is what transformers' own `generate` gives for that prompt alone."""
    import torch

    from posttrain.engine.models import ModelSource
    from posttrain.engine.runtime import ServedModel
    from posttrain.engine.sampling import Decoding, GenerationRequest, SamplingSpec, generate

    model = ServedModel(ModelSource(NAME, vision_models[NAME]), torch.float32)
    encode = model.tokenizer.encode
    prefix, suffix = (
        encode("<|im_start|>user\n<|vision_start|>"),
        encode("<|vision_end|>What colour?<|im_end|>\n"),
    )
    spec = SamplingSpec(max_tokens=8, temperature=0.0, stop_token_ids=[])
    requests = []
    for parts in (
        [prefix, image_input(png_bytes(RED), "png", IMAGE_TOKENS, "red"), suffix],
        [prefix, image_input(png_bytes(BLUE), "png", IMAGE_TOKENS, "blue"), suffix],
        [encode("<|im_start|>user\nWhat colour?<|im_end|>\n")],
    ):
        tokens, vision = model.lay_out(parts, "prompt")
        requests.append(GenerationRequest(tokens, 1, spec, vision=vision))
    decoding = Decoding(model.eos_token_ids, torch.float32, model.max_context, model.tokenizer)
    batched = generate(model.model, requests, decoding)
    for request, result in zip(requests, batched, strict=True):
        ids = torch.tensor([request.prompt_tokens])
        extra = {}
        if request.vision is not None:
            extra = request.vision.model_kwargs(torch.device("cpu"), torch.float32)
            extra["mm_token_type_ids"] = (ids == model.images.image_token_id).int()
        reference = model.model.generate(
            ids, max_new_tokens=8, do_sample=False, return_dict_in_generate=True, output_logits=True, **extra
        )
        sample = result.sequences[0]
        assert sample.tokens == reference.sequences[0, ids.shape[1] :].tolist()
        logprobs = [
            float(torch.log_softmax(step[0].float(), -1)[t])
            for step, t in zip(reference.logits, sample.tokens, strict=True)
        ]
        np.testing.assert_allclose(sample.logprobs, logprobs, atol=1e-4)
    assert batched[0].sequences[0].logprobs != batched[1].sequences[0].logprobs
