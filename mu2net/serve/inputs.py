"""Raw inputs of a request or of files -> what a task's predictor takes (generic part).

What a raw example becomes is the family's fact (:meth:`mu2net.models.base.Family.prepare_inputs`:
resize and normalisation, tokenisation). Here: decoding PNG/JPEG bytes into pixel arrays,
reading files, and parsing the JSON body of ``POST /v1/tasks/{task}:predict``, which holds
exactly one of

* ``"images"``: a list of base64 PNG/JPEG files,
* ``"texts"``: a list of strings,
* ``"inputs"``: a preprocessed batch as nested lists (float32 pixels or int32 token ids),
* ``"inputs_npy"``: a preprocessed batch as a base64 ``.npy`` file (no pickles);

or, with ``Content-Type: application/x-npy``, the bytes of a ``.npy`` file themselves (the
cheapest form for preprocessed batches: no base64, no JSON).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mu2net.serve.errors import InputError, PayloadTooLarge

BODY_KEYS = ("images", "texts", "inputs", "inputs_npy")
NPY_CONTENT_TYPE = "application/x-npy"


def decode_image(data: bytes, name: str = "image") -> np.ndarray:
    """Pixels (uint8 ``[H, W]`` or ``[H, W, 3|4]``) of PNG/JPEG bytes; ``name`` goes in errors."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.mode not in ("L", "RGB", "RGBA"):
                im = im.convert("RGBA" if "A" in im.mode else "RGB")
            return np.asarray(im)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"{name}: not a readable image (PNG or JPEG; {e})") from None


def read_image_files(files: Sequence[str]) -> list[np.ndarray]:
    """Pixels of image files (errors name the file)."""
    out = []
    for f in files:
        try:
            with open(f, "rb") as fh:
                out.append(decode_image(fh.read(), f))
        except OSError as e:
            raise InputError(f"{f}: cannot read ({e.strerror})") from None
    return out


def read_text_files(files: Sequence[str]) -> list[str]:
    """Non-empty lines of text files (one example per line)."""
    texts = []
    for f in files:
        try:
            with open(f, encoding="utf-8") as fh:
                texts.extend(line.strip() for line in fh if line.strip())
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"{f}: not a readable UTF-8 text file ({e})") from None
    if not texts:
        raise InputError(f"no text lines in {list(files)}")
    return texts


def parse_body(
    body: bytes | str | Mapping[str, Any], max_examples: int, content_type: str | None = None
) -> dict[str, Any]:
    """The request's one input field, decoded.

    Args:
        body: the request body (JSON, or ``.npy`` bytes when ``content_type`` says so).
        max_examples: more examples raise :class:`PayloadTooLarge`.
        content_type: the request's ``Content-Type``; ``application/x-npy`` means raw ``.npy``.

    Returns:
        ``{"images": [arrays]}``, ``{"texts": [...]}`` or ``{"inputs": array}``.

    Raises:
        InputError: not JSON, not one known field, bad base64, not a .npy, an unreadable image.
        PayloadTooLarge: more than ``max_examples`` examples.
    """
    if content_type and content_type.split(";")[0].strip().lower() == NPY_CONTENT_TYPE:
        if not isinstance(body, bytes):
            raise InputError(f"a {NPY_CONTENT_TYPE} body must be bytes")
        return {"inputs": _limit(_load_npy(body, "request body"), max_examples)}
    if isinstance(body, bytes | str):
        try:
            body = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"request body is not JSON ({e})") from None
    if not isinstance(body, Mapping):
        raise InputError(f"request body must be a JSON object with one of {list(BODY_KEYS)}")
    given = [k for k in BODY_KEYS if k in body]
    unknown = sorted(set(body) - set(BODY_KEYS))
    if len(given) != 1 or unknown:
        raise InputError(
            f"request body needs exactly one of {list(BODY_KEYS)}; got keys {sorted(body)}"
        )
    (key,) = given
    value = body[key]
    if key == "inputs_npy":
        return {"inputs": _limit(_npy(value), max_examples)}
    if key == "inputs":
        return {"inputs": _limit(_array(value), max_examples)}
    if not isinstance(value, list) or not value:
        raise InputError(f"{key!r} must be a non-empty list")
    _limit(value, max_examples)
    if key == "texts":
        if not all(isinstance(t, str) for t in value):
            raise InputError("'texts' must be a list of strings")
        return {"texts": list(value)}
    return {"images": [decode_image(_b64(v, f"images[{i}]"), f"images[{i}]")
                       for i, v in enumerate(value)]}  # fmt: skip


def _limit(batch: Any, max_examples: int) -> Any:
    if len(batch) > max_examples:
        raise PayloadTooLarge(f"{len(batch)} examples in one request; the limit is {max_examples}")
    return batch


def _b64(value: Any, name: str) -> bytes:
    if not isinstance(value, str):
        raise InputError(f"{name}: expected a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InputError(f"{name}: not valid base64 ({e})") from None


def _npy(value: Any) -> np.ndarray:
    return _load_npy(_b64(value, "inputs_npy"), "inputs_npy")


def _load_npy(data: bytes, name: str) -> np.ndarray:
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"{name}: not a .npy array ({e})") from None
    if not isinstance(array, np.ndarray):  # an .npz archive loads as a lazy NpzFile
        raise InputError(f"{name}: an .npz archive, not one .npy array")
    return array


def _array(value: Any) -> np.ndarray:
    if not isinstance(value, list) or not value:
        raise InputError("'inputs' must be a non-empty nested list")
    try:
        x = np.asarray(value)
    except (ValueError, TypeError) as e:
        raise InputError(f"'inputs' is not a rectangular array ({e})") from None
    if x.dtype.kind == "i":
        return x.astype(np.int32)
    if x.dtype.kind == "f":
        return x.astype(np.float32)
    raise InputError(f"'inputs' must hold numbers, got {x.dtype}")


def npy_bytes(array: np.ndarray) -> bytes:
    """The ``.npy`` file of an array (an ``application/x-npy`` body)."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
    return buf.getvalue()


def encode_npy(array: np.ndarray) -> str:
    """Base64 ``.npy`` of an array (the ``inputs_npy`` field)."""
    return base64.b64encode(npy_bytes(array)).decode("ascii")
