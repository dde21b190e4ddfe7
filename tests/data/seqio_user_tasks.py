"""Tasks written as a seqio user writes them: seqio, TensorFlow and numpy only, nothing of mu2net.

``user:blobs`` (a FunctionDataSource with its own macro-F1 metric), ``user:tfds_mnist`` (a
TfdsDataSource; run under ``tfds.testing.mock_data``) and the broken ones the tests expect
errors from: ``user:no_classes`` (no class count anywhere), ``user:float_targets``,
``user:unlabelled_test`` (the test split has no labels).
"""

import numpy as np
import seqio
import tensorflow as tf

NUM_CLASSES = 2
SIZES = {"train": 64, "validation": 32, "test": 32}


def _examples(split, shuffle_files=False, seed=None, *, labelled=True, float_labels=False):
    del shuffle_files, seed
    n = SIZES[split]
    rng = np.random.default_rng({"train": 0, "validation": 1, "test": 2}[split])
    labels = (np.arange(n) % NUM_CLASSES).astype(np.int32)
    images = np.clip(0.25 + 0.5 * labels[:, None, None, None]
                     + 0.1 * rng.normal(size=(n, 8, 8, 3)), 0, 1).astype(np.float32)  # fmt: skip
    features = {"inputs": images}
    if labelled:
        features["targets"] = labels[:, None].astype(np.float32 if float_labels else np.int32)
    return tf.data.Dataset.from_tensor_slices(features)


def macro_f1(targets, predictions):
    """Mean F1 over the classes present: a metric seqio users define per task."""
    t, p = np.asarray(targets).reshape(-1), np.asarray(predictions).reshape(-1)
    f1s = []
    for c in np.union1d(t, p):
        tp = np.sum((t == c) & (p == c))
        denom = np.sum(t == c) + np.sum(p == c)
        f1s.append(2 * tp / denom if denom else 0.0)
    return {"macro_f1": float(np.mean(f1s)), "support": float(t.size)}


def label_feature(vocab):
    return seqio.Feature(vocab, add_eos=False, dtype=tf.int32, rank=1)


IMAGE = seqio.ContinuousFeature(dtype=tf.float32, rank=3)
PASS = seqio.PassThroughVocabulary(size=NUM_CLASSES)

seqio.TaskRegistry.add(
    "user:blobs",
    source=seqio.FunctionDataSource(_examples, splits=list(SIZES), num_input_examples=dict(SIZES)),
    preprocessors=[seqio.CacheDatasetPlaceholder()],
    output_features={"inputs": IMAGE, "targets": label_feature(PASS)},
    metric_fns=[macro_f1],
)


def _mnist_to_features(ex):
    image = tf.image.resize(tf.cast(ex["image"], tf.float32) / 255.0, [8, 8])
    return {"inputs": tf.image.grayscale_to_rgb(image),
            "targets": tf.reshape(tf.cast(ex["label"], tf.int32), [1])}  # fmt: skip


seqio.TaskRegistry.add(
    "user:tfds_mnist",
    source=seqio.TfdsDataSource(
        "mnist:3.*.*",
        splits={"train": "train[:48]", "validation": "train[48:64]", "test": "test[:16]"},
    ),
    preprocessors=[seqio.map_over_dataset(_mnist_to_features)],
    # A user's own vocabulary (no size): the class count comes from TFDS's ClassLabel.
    output_features={"inputs": IMAGE, "targets": label_feature(seqio.PassThroughVocabulary(0))},
)

seqio.TaskRegistry.add(
    "user:no_classes",
    source=seqio.FunctionDataSource(_examples, splits=list(SIZES)),
    preprocessors=[],
    output_features={"inputs": IMAGE, "targets": label_feature(seqio.ByteVocabulary())},
)

seqio.TaskRegistry.add(
    "user:float_targets",
    source=seqio.FunctionDataSource(
        lambda split, shuffle_files=False, seed=None: _examples(split, float_labels=True),
        splits=list(SIZES),
    ),
    preprocessors=[],
    output_features={
        "inputs": IMAGE,
        "targets": seqio.ContinuousFeature(dtype=tf.float32, rank=1),
    },  # fmt: skip
)

seqio.TaskRegistry.add(
    "user:unlabelled_test",
    source=seqio.FunctionDataSource(
        lambda split, shuffle_files=False, seed=None: _examples(split, labelled=split != "test"),
        splits=list(SIZES),
    ),
    preprocessors=[],
    output_features={"inputs": IMAGE, "targets": label_feature(PASS)},
)
