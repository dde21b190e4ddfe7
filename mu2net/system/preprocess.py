"""Turning user files into a path's inputs for ``mu2net predict`` (no TensorFlow).

Images are read with PIL, converted to RGB (grey images are replicated), resized to the path's
``ds_image_size`` (bilinear, aspect ratio not kept, as the training pipeline does), scaled to
[0, 1] and normalised with the family's mean/std. Text files hold one example per line and are
tokenised with the family's tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mu2net.system.state import Path


def load_images(files: Sequence[str], size: int, mean, std) -> np.ndarray:
    """A float32 batch [N, size, size, 3] from image files."""
    from PIL import Image

    out = []
    for f in files:
        try:
            with Image.open(f) as im:
                im = im.convert("RGB").resize((size, size), Image.BILINEAR)
                x = np.asarray(im, np.float32) / 255.0
        except (OSError, ValueError) as e:
            raise ValueError(f"{f}: not a readable image ({e})") from e
        out.append((x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32))
    return np.stack(out).astype(np.float32)


def load_texts(files: Sequence[str]) -> list[str]:
    """Non-empty lines of text files (one example per line)."""
    texts = []
    for f in files:
        with open(f, encoding="utf-8") as fh:
            texts.extend(line.strip() for line in fh if line.strip())
    if not texts:
        raise ValueError(f"no text lines in {list(files)}")
    return texts


def load_inputs(path: Path, files: Sequence[str]) -> np.ndarray:
    """The batch ``path`` expects, built from ``files``."""
    from mu2net.models.base import get_family

    family = get_family(path.family)
    if family.modality == "text":
        from mu2net.models.bert import tokenize

        return tokenize(load_texts(files), int(path.hparams.get("ds_max_length", 64)))
    return load_images(
        files, int(path.hparams["ds_image_size"]), family.pixel_mean, family.pixel_std
    )
