"""Suite mixtures and the versioned live mixture."""

import numpy as np
import pytest
import seqio
import tensorflow as tf

import mu2net.mixtures as M
from mu2net.tasks import TaskError
from mu2net.tasks.registry import register_classification_task, unregister


def test_suite_mixtures_registered():
    assert M.suite_tasks("mu2net:tfds.vtab1k")[0] == "mu2net:tfds.vtab1k.caltech101"
    assert len(M.suite_tasks("mu2net:tfds.vtab")) == 23
    mix = seqio.get_mixture_or_task("mu2net:bundled_images")
    assert "mu2net:digits" in [t.name for t in mix.tasks]
    assert len(seqio.get_mixture_or_task("mu2net:bundled_pairs").tasks) == 135
    with pytest.raises(TaskError, match="Unknown suite mixture"):
        M.suite_tasks("mu2net:nope")


def test_live_mixture_versioning():
    assert M.live_mixture_name("sys1", 3) == "mu2net_live:sys1:v3"
    with pytest.raises(TaskError, match="System name"):
        M.live_mixture_name("my system", 1)
    tasks = M.add_task([], "lfw_faces")
    tasks = M.add_task(tasks, "mu2net:digits_parity")
    assert tasks == ["mu2net:lfw_faces", "mu2net:digits_parity"]
    mix = M.register_live_mixture("sysA", tasks, 1)
    assert mix.name == "mu2net_live:sysA:v1"
    assert {t.name for t in mix.tasks} == set(tasks)
    assert M.register_live_mixture("sysA", tasks, 1) is mix  # idempotent
    assert M.ensure_live_mixture("sysA", tasks) is mix
    with pytest.raises(TaskError, match="different task list"):
        M.register_live_mixture("sysA", tasks + ["mu2net:mnist5k_pair_01"], 1)
    grown = M.ensure_live_mixture("sysA", tasks + ["mu2net:mnist5k_pair_01"])
    assert grown.name == "mu2net_live:sysA:v2" and M.latest_live_version("sysA") == 2
    assert seqio.get_mixture_or_task("mu2net_live:sysA:v1") is mix  # old version kept
    M.register_live_mixture("sysC", ["mu2net:digits"], 3)
    with pytest.raises(TaskError, match="older than the latest"):
        M.register_live_mixture("sysC", ["mu2net:digits", "mu2net:lfw_faces"], 2)
    with pytest.raises(TaskError, match="duplicate tasks"):
        M.register_live_mixture("sysB", ["digits", "mu2net:digits"], 1)
    with pytest.raises(TaskError, match="mu2net:digits_parity"):
        M.register_live_mixture("sysB", ["digits_parit"], 1)


def test_add_task_validates():
    with pytest.raises(TaskError, match="already in the live task list"):
        M.add_task(["mu2net:lfw_faces"], "lfw_faces")
    with pytest.raises(TaskError, match="Unknown task 'mu2net:nonexistent'"):
        M.add_task([], "nonexistent")

    def fn(split, shuffle_files=False, seed=None):
        y = np.array([[0], [5]], np.int32)
        return tf.data.Dataset.from_tensor_slices({"inputs": np.zeros((2, 3, 3, 3), np.float32),
                                                   "targets": y})  # fmt: skip

    src = seqio.FunctionDataSource(fn, splits=("train", "validation", "test"))
    register_classification_task("mu2net:t_live_bad", src, [], num_classes=3)
    try:
        with pytest.raises(TaskError, match="t_live_bad.*'targets' label 5"):
            M.add_task(["mu2net:lfw_faces"], "t_live_bad")
    finally:
        unregister("t_live_bad")
