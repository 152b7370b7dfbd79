"""Image classification rows, in the shapes of the cookbook's `vlm_classifier` recipe.

A row is `{"image": "<path or URL>", "label": "cat"}`. The image is a path relative to the data file's folder,
an absolute path, a `file://` URL or an `http(s)://` URL; the class list is the set of labels in the data.

Checked before anything is spent: both fields present and non-empty, and every local image exists and decodes
(PIL). URLs are not fetched then (a data set of URLs would be downloaded twice); a URL that cannot be fetched later
is one line naming it (`load_image`).

The conversation is the recipe's: the user turn is the image and the question (here also listing the classes, so
the base model can answer at all); the assistant answers "The subject in this photo is: <class name>". The class
name is the label as the recipe cleans it (`_ . -` become spaces, lower case), and a sampled answer is read as
the recipe reads it: the text after the last ":", stripped and lower-cased.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from posttrain.errors import DataError
from posttrain.util import short_error

if TYPE_CHECKING:
    from PIL import Image
    from tinker_cookbook.renderers import Message

# The recipe's words (recipes/vlm_classifier/data.py and eval.py; a test pins them against the recipe).
QUESTION = "What is the name of the subject in this photo?"
ANSWER_PREFIX = "The subject in this photo is:"
# The recipe's `max_image_size`: the longest side an image is resized to before it is sent.
MAX_IMAGE_SIZE = 480
URL_SCHEMES = ("http", "https")
FETCH_TIMEOUT_SECONDS = 30.0


# --- rows ------------------------------------------------------------------------------------------------


def is_url(ref: str) -> bool:
    return urlparse(ref).scheme in URL_SCHEMES


def _local_path(ref: str) -> Path | None:
    """The file a local reference names (a path or a file:// URL); None for anything else."""
    parsed = urlparse(ref)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    # One letter is a Windows drive ("C:\\..."), not a scheme.
    if parsed.scheme == "" or len(parsed.scheme) == 1:
        return Path(ref).expanduser()
    return None


def rows_relative_to(rows: Iterable[tuple[str, dict]], data_file: str) -> Iterator[tuple[str, dict]]:
    """Rows of a local data file, their relative `image` paths made absolute from the file's folder (where a
    user keeps images beside the data, whatever folder the run is started from)."""
    folder = Path(data_file).expanduser().resolve().parent
    for where, row in rows:
        ref = row.get("image") if isinstance(row, dict) else None
        if isinstance(ref, str) and ref.strip():
            path = _local_path(ref.strip())
            if path is not None and not path.is_absolute() and urlparse(ref).scheme != "file":
                row = {**row, "image": str(folder / path)}
        yield where, row


def image_row(row: dict, where: str) -> dict:
    """A validated row: `{"image": <absolute path or URL>, "label": <as given>}`."""
    ref = _text_field(row, "image", where, "a path or URL")
    label = _label(row, where)
    if is_url(ref):
        return {"image": ref, "label": label}  # fetched when used; see the module docstring
    path = _local_path(ref)
    if path is None:
        raise DataError(
            f'{where}: field "image" is {ref!r}; expected a file path, a file:// URL or an http(s):// URL'
        )
    if not path.is_file():
        raise DataError(f'{where}: field "image": {path} does not exist')
    _check_decodes(path, where)
    return {"image": str(path), "label": label}


def _text_field(row: dict, field: str, where: str, what: str) -> str:
    value = row.get(field)
    if value is None:
        raise DataError(f'{where}: field "{field}" is missing ({what})')
    if not isinstance(value, str):
        got = type(value).__name__
        raise DataError(f'{where}: field "{field}" must be a string ({what}), got {got}')
    if not value.strip():
        raise DataError(f'{where}: field "{field}" is empty')
    return value.strip()


def _label(row: dict, where: str) -> str:
    value = row.get("label")
    # Hugging Face class labels are integers; bool is an int subclass but never a class.
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    label = _text_field(row, "label", where, "the class name")
    if ":" in label or "\n" in label:
        # The answer is read after the last ":" (the recipe's parsing), so a class name cannot hold one.
        raise DataError(
            f'{where}: field "label" is {label!r}; a class name cannot contain ":" or a line break'
        )
    return label


def _check_decodes(path: Path, where: str) -> None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            # JPEG decodes at a reduced scale: every byte is still read, so a truncated file still fails.
            image.draft("RGB", (64, 64))
            image.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(
            f'{where}: field "image": {path} cannot be read as an image ({short_error(exc, 160)})'
        ) from None


# --- classes -------------------------------------------------------------------------------------------------


def class_name(label: str) -> str:
    """The label as the recipe teaches it (`get_class_name`): `_ . -` become spaces, lower case."""
    return label.replace("_", " ").replace(".", " ").replace("-", " ").lower()


def class_names(rows: Iterable[dict]) -> list[str]:
    """The classes of the data (every label's class name), sorted so the question is the same in every run."""
    return sorted({class_name(r["label"]) for r in rows})


def predicted_class(text: str) -> str:
    """A sampled answer read as the recipe reads it: after the last ":", stripped, lower-cased."""
    return text.split(":")[-1].strip().lower()


# --- images and conversations ---------------------------------------------------------------------------------


def load_image(ref: str) -> Image.Image:
    """The image, resized as the recipe does (longest side MAX_IMAGE_SIZE); a URL is fetched. One line
    (`DataError`) naming the image when it cannot be had."""
    from PIL import Image
    from tinker_cookbook.image_processing_utils import resize_image

    try:
        if is_url(ref):
            image = Image.open(io.BytesIO(_fetch(ref)))
        else:
            path = _local_path(ref)
            image = Image.open(path if path is not None else ref)
        image.load()
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL and urllib raise many unrelated types
        raise DataError(f"image {ref}: cannot be read ({short_error(exc, 200)})") from None
    # JPEG (what is sent) holds RGB or grey; palette, alpha and 16-bit images are converted.
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    return resize_image(image=image, max_size=MAX_IMAGE_SIZE)


def _fetch(url: str) -> bytes:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_SECONDS) as response:
            return response.read()
    except Exception as exc:  # noqa: BLE001 - HTTP errors, DNS, timeouts, proxies: all one line
        raise DataError(f"image {url}: cannot be fetched ({short_error(exc, 200)})") from None


def placeholder_image() -> Image.Image:
    """An image of the largest size sent (MAX_IMAGE_SIZE square): an upper bound on an unfetched image's tokens."""
    from PIL import Image

    return Image.new("RGB", (MAX_IMAGE_SIZE, MAX_IMAGE_SIZE), (128, 128, 128))


def question(classes: Sequence[str]) -> str:
    """The recipe's question, with the classes to choose from."""
    return f"{QUESTION} Answer with one of: {', '.join(classes)}."


def answer(label: str) -> str:
    """The assistant's turn for a label, as the recipe writes it."""
    return f"{ANSWER_PREFIX} {class_name(label)}\n"


def prompt_messages(image: Any, classes: Sequence[str]) -> list[Message]:
    """The user turn: the image, then the question."""
    from tinker_cookbook.renderers import ImagePart, Message, TextPart

    content = [ImagePart(type="image", image=image), TextPart(type="text", text=question(classes))]
    return [Message(role="user", content=content)]


def training_messages(image: Any, label: str, classes: Sequence[str]) -> list[Message]:
    """The user turn and the answer to train on."""
    from tinker_cookbook.renderers import Message, TextPart

    reply = Message(role="assistant", content=[TextPart(type="text", text=answer(label))])
    return [*prompt_messages(image, classes), reply]
