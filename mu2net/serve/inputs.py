"""Raw inputs of a request or of files -> what a task's predictor takes (generic part).

What a raw example becomes is the family's fact (:meth:`mu2net.models.base.Family.prepare_inputs`:
resize and normalisation, tokenisation). Here: decoding PNG/JPEG bytes into pixel arrays,
reading files, and parsing the JSON body of ``POST /v1/tasks/{task}:predict``, which holds
exactly one of

* ``"images"``: a list of base64 PNG/JPEG files,
* ``"texts"``: a list of strings,
* ``"inputs"``: a preprocessed batch as nested lists (float32 pixels or int32 token ids),
* ``"inputs_npy"``: a preprocessed batch as a base64 ``.npy`` file (no pickles).
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


def parse_body(body: bytes | str | Mapping[str, Any], max_examples: int) -> dict[str, Any]:
    """The request's one input field, decoded.

    Returns ``{"images": [arrays]}``, ``{"texts": [...]}`` or ``{"inputs": array}``.

    Raises:
        InputError: not JSON, not one known field, bad base64, an unreadable image.
        PayloadTooLarge: more than ``max_examples`` examples.
    """
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
    try:
        return np.load(io.BytesIO(_b64(value, "inputs_npy")), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"inputs_npy: not a .npy array ({e})") from None


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


def encode_npy(array: np.ndarray) -> str:
    """Base64 ``.npy`` of an array (the ``inputs_npy`` field)."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")
