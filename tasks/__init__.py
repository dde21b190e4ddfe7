"""mu2net tasks: seqio Tasks for the bundled offline data and the paper's TFDS benchmarks.

``import mu2net.tasks`` registers (names ``mu2net:<name>``):

* bundled real tasks: ``digits``, ``mnist5k``, ``animal_mnist``, ``lfw_faces`` (images),
  ``rotten_tomatoes``, ``debates2016`` (text), and ``fashion_mnist`` when the Debian package is
  installed (:mod:`mu2net.tasks.bundled`);
* derived tasks (real inputs, new labels): ``digits_parity``, ``mnist5k_ge5``,
  ``animal_halves``, ``animal_domestic`` and 135 class-pair tasks ``<source>_pair_<a><b>``;
* 69 TFDS benchmark tasks in five suites, ``mu2net:tfds.*`` (:mod:`mu2net.tasks.tfds_tasks`).

Any task registered with seqio alone joins too (:func:`describe_task`, :func:`task_info`), and
every task is scored by its own seqio ``metric_fns`` (:func:`primary_metric`, :func:`task_metrics`).

The trainer reads data through :mod:`mu2net.tasks.data` (re-exported here), which applies the
dataset hyperparameters after seqio's cache point (:mod:`mu2net.tasks.preprocessing`).
"""

from mu2net.tasks import bundled, tfds_tasks
from mu2net.tasks.data import (
    base_dataset,
    get_dataset,
    load_split,
    numpy_batches,
    validate_task,
)
from mu2net.tasks.metrics import (
    ClassificationFeatureConverter,
    TextClassificationFeatureConverter,
    accuracy,
    confusion_matrix,
    primary_metric,
    task_metrics,
)
from mu2net.tasks.preprocessing import DEFAULT_DS_HPARAMS, resolve_ds_hparams
from mu2net.tasks.registry import (
    SPLITS,
    TaskError,
    TaskInfo,
    describe_task,
    is_registered,
    list_tasks,
    register_classification_task,
    task_info,
)

if not bundled.BASE_TASKS:  # guards against a second registration via importlib.reload
    bundled.register_all()
    tfds_tasks.register_all()

BUNDLED_IMAGE_TASKS = [
    n for n in bundled.BASE_TASKS + bundled.DERIVED_TASKS if task_info(n).modality == "image"
]
BUNDLED_TEXT_TASKS = [
    n for n in bundled.BASE_TASKS + bundled.DERIVED_TASKS if task_info(n).modality == "text"
]
PAIR_TASKS = bundled.PAIR_TASKS
TFDS_SUITES = tfds_tasks.SUITE_TASKS

__all__ = [
    "BUNDLED_IMAGE_TASKS",
    "BUNDLED_TEXT_TASKS",
    "DEFAULT_DS_HPARAMS",
    "PAIR_TASKS",
    "SPLITS",
    "TFDS_SUITES",
    "ClassificationFeatureConverter",
    "TaskError",
    "TaskInfo",
    "TextClassificationFeatureConverter",
    "accuracy",
    "base_dataset",
    "confusion_matrix",
    "describe_task",
    "get_dataset",
    "is_registered",
    "list_tasks",
    "load_split",
    "numpy_batches",
    "primary_metric",
    "register_classification_task",
    "resolve_ds_hparams",
    "task_info",
    "task_metrics",
    "validate_task",
]
