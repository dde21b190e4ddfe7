"""seqio Beam cache round trip (DirectRunner) on a tiny bundled task."""

import json
import os

import numpy as np
import seqio

import mu2net.tasks as T
from mu2net.tasks import cache

KW = dict(pixel_mean=(0.5, 0.5, 0.5), pixel_std=(0.5, 0.5, 0.5))


def test_cache_round_trip_lfw(tmp_path):
    # Beam's DirectRunner costs ~10 s per split here (graph construction), so one split.
    out = cache.cache_tasks(["lfw_faces"], str(tmp_path), splits=["train"])
    task_dir = os.path.join(str(tmp_path), seqio.get_task_dir_from_name("mu2net:lfw_faces"))
    assert out == [task_dir] and os.path.exists(os.path.join(task_dir, "COMPLETED"))
    with open(seqio.get_cached_info_path(task_dir, "train")) as f:
        assert json.load(f)["features"]["inputs"] == {"shape": [None, 25, 3], "dtype": "float32"}
    assert seqio.get_mixture_or_task("mu2net:lfw_faces").cache_dir == task_dir
    hp = {"ds_image_size": 16}
    for split in ["train"]:
        fresh = T.load_split("lfw_faces", split, ds_hparams=hp, **KW)
        cached = T.load_split("lfw_faces", split, ds_hparams=hp, use_cached=True, **KW)
        np.testing.assert_array_equal(cached["inputs"], fresh["inputs"])  # same order, bits
        np.testing.assert_array_equal(cached["targets"], fresh["targets"])
    # train streams read from the cache are seeded the same way
    a = next(T.numpy_batches("lfw_faces", "train", batch_size=16, ds_hparams=hp, train=True,
                             seed=3, use_cached=True, **KW))  # fmt: skip
    b = next(T.numpy_batches("lfw_faces", "train", batch_size=16, ds_hparams=hp, train=True,
                             seed=3, **KW))  # fmt: skip
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    assert cache.cache_tasks(["lfw_faces"], str(tmp_path)) == []  # already cached: skipped
