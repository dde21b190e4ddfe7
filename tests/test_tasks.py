"""Bundled tasks, preprocessing, data API, metrics and error handling (CPU, offline)."""

import gzip
import pickle

import numpy as np
import pytest
import seqio
import tensorflow as tf

import mu2net.tasks as T
from mu2net.tasks import bundled, metrics, preprocessing, text
from mu2net.tasks.registry import TaskError, register_classification_task, unregister

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
KW = dict(pixel_mean=MEAN, pixel_std=STD)


def test_registration_counts_and_metadata():
    assert len(T.BUNDLED_IMAGE_TASKS) >= 8 and len(T.BUNDLED_TEXT_TASKS) == 2
    assert len(T.PAIR_TASKS) == 135 and all(T.is_registered(n) for n in T.PAIR_TASKS)
    info = T.task_info("digits_parity")
    assert info.derived and not info.synthetic and info.class_names == ("even", "odd")
    assert T.task_info("mu2net:rotten_tomatoes").modality == "text"
    assert T.task_info("lfw_faces").split_sizes == {"train": 120, "validation": 40, "test": 40}
    assert T.task_info("mnist5k_pair_27").class_names == ("2", "7")
    assert T.task_info("mnist5k_pair_27").split_sizes == {"train": 600, "validation": 200,
                                                         "test": 200}  # fmt: skip
    assert bundled.fashion_available() == T.is_registered("fashion_mnist")


@pytest.mark.parametrize(
    "name", T.BUNDLED_IMAGE_TASKS + T.BUNDLED_TEXT_TASKS + ["mu2net:animal_mnist_pair_09"]
)
def test_every_bundled_task_yields_declared_shapes(name):
    info = T.task_info(name)
    for ex in T.get_dataset(
        name, "test", ds_hparams={"ds_image_size": 24, "ds_max_length": 12}, train=False, **KW
    ).take(2):
        assert ex["targets"].dtype == tf.int32 and ex["targets"].shape == (1,)
        assert 0 <= int(ex["targets"][0]) < info.num_classes
        if info.modality == "image":
            assert ex["inputs"].dtype == tf.float32 and ex["inputs"].shape == (24, 24, 3)
        else:
            assert ex["inputs"].dtype == tf.int32 and ex["inputs"].shape == (12,)
    base = T.base_dataset(name, "train").element_spec
    want = (tf.float32, 3) if info.modality == "image" else (tf.int32, 1)
    assert (base["inputs"].dtype, base["inputs"].shape.rank) == want


@pytest.mark.parametrize("key", ["digits", "mnist5k", "animal_mnist", "lfw_faces",
                                 "rotten_tomatoes", "debates2016"])  # fmt: skip
def test_split_sizes_and_class_balance(key):
    src = bundled.SOURCES[key]
    _, y = bundled.load_source(key)
    np.testing.assert_array_equal(np.bincount(y), src.class_counts)  # recorded facts hold
    splits = bundled.source_splits(key)
    assert {s: len(v) for s, v in splits.items()} == T.task_info(key).split_sizes
    allidx = np.concatenate(list(splits.values()))
    assert np.array_equal(np.sort(allidx), np.arange(y.size))  # disjoint and complete
    for split, frac in zip(T.SPLITS, bundled.SPLIT_FRACTIONS):
        counts = np.bincount(y[splits[split]], minlength=len(src.class_counts))
        assert np.all(np.abs(counts - frac * np.asarray(src.class_counts)) <= 1)
    assert not np.all(np.diff(y[splits["test"][:50]]) >= 0)  # class-mixed order
    # Derived tasks reuse the source split: an image is in the same split everywhere.
    assert bundled.stratified_split(y)["train"].tolist() == splits["train"].tolist()


def test_eval_is_resize_only_and_normalised():
    hp = {"ds_image_size": 16}
    got = T.load_split("lfw_faces", "validation", ds_hparams=hp, **KW)
    assert got["inputs"].shape == (40, 16, 16, 3) and got["targets"].dtype == np.int32
    x, _ = bundled.load_source("lfw_faces")
    idx = bundled.source_splits("lfw_faces")["validation"]
    want = tf.image.resize(np.repeat(x[idx][..., None], 3, -1), [16, 16]).numpy()
    want = (np.clip(want, 0, 1) - 0.5) / 0.25
    np.testing.assert_allclose(got["inputs"], want, atol=1e-5)
    # grayscale replicated to 3 channels; labels in split order
    np.testing.assert_array_equal(got["inputs"][..., 0], got["inputs"][..., 2])
    np.testing.assert_array_equal(got["targets"], bundled.load_source("lfw_faces")[1][idx])
    again = T.load_split("lfw_faces", "validation", ds_hparams=hp, max_examples=7, **KW)
    np.testing.assert_array_equal(again["inputs"], got["inputs"][:7])


def _stream(seed, hp, n=5):
    it = T.numpy_batches(
        "lfw_faces", "train", batch_size=32, ds_hparams=hp, train=True, seed=seed, repeat=True,
        **KW,
    )  # fmt: skip
    return [next(it) for _ in range(n)]  # 160 examples: crosses the 120-example epoch


def test_train_stream_deterministic_given_seed():
    hp = {"ds_image_size": 20, "ds_brightness_delta": 0.1, "ds_contrast_delta": 0.1,
          "ds_saturation_delta": 0.1, "ds_hue_delta": 0.05, "ds_quality_delta": 0.1}  # fmt: skip
    a, b, c = _stream(7, hp), _stream(7, hp), _stream(8, hp)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
        np.testing.assert_array_equal(x["targets"], y["targets"])
        assert x["targets"].shape == (32,) and x["targets"].dtype == np.int32
    assert not np.array_equal(a[0]["inputs"], c[0]["inputs"])
    # augmentation is on: the same image looks different from its eval version
    ev = T.load_split("lfw_faces", "train", ds_hparams=hp, **KW)
    assert not any(np.allclose(a[0]["inputs"][0], e) for e in ev["inputs"])
    # epoch 2 reshuffles: the first 32 examples of epoch 2 differ from epoch 1's
    labels = np.concatenate([x["targets"] for x in a])
    assert sorted(labels[:120].tolist()) == sorted(ev["targets"].tolist())


def test_augmentations_off_train_equals_eval_pixels():
    hp = {"ds_image_size": 25, "ds_crop": False, "ds_flip_left_right": False}
    batch = _stream(1, hp, n=4)
    ev = T.load_split("lfw_faces", "train", ds_hparams=hp, **KW)
    seen = {e.tobytes() for e in ev["inputs"]}
    assert all(x.tobytes() in seen for b in batch for x in b["inputs"])


def test_text_tokenizer_truncation_and_padding():
    vocab = text.minilm_vocabulary()
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(text.minilm_tokenizer_path())
    tok.no_padding()  # the shipped file pads to 128; our vocabulary does not
    assert vocab.encode("Hello world") == tok.encode("Hello world").ids
    assert vocab.pad_id == 0 and vocab.decode(vocab.encode("hello world")) == "hello world"
    ids = tf.constant(vocab.encode("a b c d e f g h i j k"), tf.int32)  # 13 ids with CLS/SEP
    short = preprocessing.preprocess_text(ids, {"ds_max_length": 6}).numpy()
    assert short.tolist() == ids.numpy()[:5].tolist() + [vocab.eos_id]
    long = preprocessing.preprocess_text(ids, {"ds_max_length": 20}).numpy()
    assert long[:13].tolist() == ids.numpy().tolist() and not long[13:].any()
    b = next(T.numpy_batches("debates2016", "validation", batch_size=4, train=False,
                             ds_hparams={"ds_max_length": 32}, **KW))  # fmt: skip
    assert b["inputs"].shape == (4, 32) and b["inputs"].dtype == np.int32
    assert (b["inputs"][:, 0] == 101).all()  # [CLS]


def test_metrics_and_confusion_matrix():
    assert metrics.accuracy([1, 2, 3, 4], [1, 2, 0, 4]) == {"accuracy": 0.75}
    cm = metrics.confusion_matrix([0, 1, 1, 2], [0, 1, 2, 2], 3)
    np.testing.assert_array_equal(cm, [[1, 0, 0], [0, 1, 1], [0, 0, 1]])
    np.testing.assert_allclose(metrics.per_class_accuracy(cm), [1, 0.5, 1])
    with pytest.raises(ValueError, match="predictions value 3 outside"):
        metrics.confusion_matrix([0], [3], 3)
    assert metrics.label_postprocessor([4]) == 4 and metrics.label_postprocessor(b"2") == 2


def test_seqio_evaluator_with_given_predictions():
    ev = seqio.Evaluator(
        "mu2net:lfw_faces", feature_converter=metrics.ClassificationFeatureConverter(),
        eval_split="validation", use_memory_cache=False, async_compute_metrics=False,
    )  # fmt: skip
    truth = T.load_split("lfw_faces", "validation", ds_hparams=None, **KW)["targets"]
    preds = truth.copy()
    preds[:10] = 1 - preds[:10]  # 10 of 40 wrong -> 0.75

    def predict_fn(ds):
        return [(int(i), np.array([preds[int(i)]])) for i, _ in ds.as_numpy_iterator()]

    out, _ = ev.evaluate(compute_metrics=True, predict_fn=predict_fn)
    assert out.result()["mu2net:lfw_faces"] == {"accuracy": 0.75}


def _register_arrays(name, x, y, num_classes=2, **kw):
    def fn(split, shuffle_files=False, seed=None):
        return tf.data.Dataset.from_tensor_slices({"inputs": x, "targets": y})

    src = seqio.FunctionDataSource(fn, splits=T.SPLITS)
    prep = kw.pop("preprocessors", [seqio.CacheDatasetPlaceholder()])
    return register_classification_task(name, src, prep, num_classes=num_classes, **kw)


@pytest.fixture
def scratch():
    names = []
    yield names
    for n in names:
        unregister(n)


def test_bad_inputs_raise_clear_errors(scratch):
    with pytest.raises(TaskError, match="mu2net:digits_parity"):
        T.task_info("digits_parit")
    with pytest.raises(TaskError, match="unknown split 'valid'"):
        T.get_dataset("digits", "valid", ds_hparams=None, train=False, **KW)
    with pytest.raises(TaskError, match="ds_image_sise"):
        T.get_dataset("digits", "test", ds_hparams={"ds_image_sise": 8}, train=False, **KW)
    with pytest.raises(TaskError, match="duplicate registration"):
        bundled.register_bundled(bundled.base_specs()[0])
    with pytest.raises(TaskError, match="allowed characters"):
        _register_arrays("mu2net:bad/name", np.zeros((2, 4, 4, 3), np.float32),
                         np.zeros((2, 1), np.int32))  # fmt: skip
    ok_x = np.random.default_rng(0).random((4, 5, 5, 3), np.float32)
    cases = {
        "mu2net:t_badlabel": (ok_x, np.array([[0], [1], [2], [1]], np.int32), "'targets' label 2"),
        "mu2net:t_nan": (np.where(ok_x > 0.9, np.nan, ok_x).astype(np.float32),
                         np.zeros((4, 1), np.int32), "'inputs' has NaN"),
        "mu2net:t_empty": (ok_x[:0], np.zeros((0, 1), np.int32), "empty split"),
    }  # fmt: skip
    for name, (x, y, msg) in cases.items():
        _register_arrays(name, x, y)
        scratch.append(name)
        with pytest.raises(TaskError, match=f"{name}.*{msg}|{msg}.*{name}"):
            T.validate_task(name)
    with pytest.raises(TaskError, match="t_badlabel.*'targets'"):
        T.load_split("t_badlabel", "test", ds_hparams=None, **KW)
    # wrong dtype/rank: seqio's own check, re-raised naming the task
    _register_arrays("mu2net:t_rank", np.zeros((2, 4, 4), np.float32), np.zeros((2, 1), np.int32))
    scratch.append("mu2net:t_rank")
    with pytest.raises(TaskError, match="t_rank"):
        T.validate_task("t_rank")
    assert T.validate_task("lfw_faces").num_classes == 2


def test_numpy_only_unpickler_and_idx_reader(tmp_path, monkeypatch):
    evil = tmp_path / "evil.gz"
    with gzip.open(evil, "wb") as f:
        pickle.dump(print, f)  # any global other than numpy's
    with pytest.raises(pickle.UnpicklingError, match="blocked global builtins.print"):
        bundled.numpy_only_unpickle(str(evil))
    good = tmp_path / "ok.gz"
    with gzip.open(good, "wb") as f:
        pickle.dump(np.arange(6, dtype=np.uint8).reshape(2, 3), f)
    assert bundled.numpy_only_unpickle(str(good)).shape == (2, 3)
    arr = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    hdr = bytes([0, 0, 8, 3]) + np.array([2, 28, 28], ">u4").tobytes()
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(hdr + arr.tobytes()))
    np.testing.assert_array_equal(
        bundled.read_idx(str(tmp_path / "train-images-idx3-ubyte.gz")), arr
    )
    (tmp_path / "bad.gz").write_bytes(gzip.compress(hdr + arr.tobytes()[:-5]))
    with pytest.raises(TaskError, match="header says"):
        bundled.read_idx(str(tmp_path / "bad.gz"))
    monkeypatch.setenv(bundled.FASHION_DIR_ENV, str(tmp_path))
    assert bundled.fashion_available()
    assert bundled.source_split_sizes("fashion_mnist") == {"train": 50000, "validation": 10000,
                                                           "test": 10000}  # fmt: skip
