"""TFDS benchmark tasks: registration, VTAB split strings, labels, and mock-TFDS pipelines."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import mu2net.tasks as T
from mu2net.tasks import tfds_tasks as TT

KW = dict(pixel_mean=(0.5, 0.5, 0.5), pixel_std=(0.5, 0.5, 0.5))


def test_five_suites_69_tasks_with_reference_names():
    sizes = {k: len(v) for k, v in T.TFDS_SUITES.items()}
    assert sizes == {"vit": 3, "vtab": 23, "vdd": 10, "chars": 8, "vtab1k": 25}
    names = [n for v in T.TFDS_SUITES.values() for n in v]
    assert len(set(names)) == 69
    assert TT.reference_task_name("smallnorb/label_azimuth/1") == (
        "mu2net:tfds.vtab1k.smallnorb.label_azimuth"
    )
    assert TT.reference_task_name("smallnorb/label_elevatio") == (
        "mu2net:tfds.smallnorb.label_elevation"
    )
    assert "mu2net:tfds.diabetic_retinopathy_detection.btgraham_300" in names
    assert "mu2net:tfds.visual_domain_decathlon.vgg_flowers" in names
    info = T.task_info("tfds.vtab1k.clevr.count_all")
    assert info.num_classes == 8 and info.split_sizes["train"] == 800
    assert info.metadata["tfds_splits"] == {
        "train": "clevr:3.*.* train[:800]",
        "validation": "clevr:3.*.* train[63000:63200]",
        "test": "clevr:3.*.* validation",
    }


def test_vtab_and_reference_split_strings():
    assert TT.vtab_split_strings("caltech101") | {} == {
        "train": "train[:2754]", "val": "train[2754:]", "trainval": "train", "test": "test",
        "val200": "train[2754:2954]", "train800": "train[:800]",
        "train800val200": "train[:800]+train[2754:2954]",
    }  # fmt: skip
    e = TT.vtab_split_strings("eurosat")
    assert (e["train"], e["val"], e["test"]) == ("train[:16200]", "train[16200:21600]",
                                                 "train[21600:]")  # fmt: skip
    d = TT.vtab_split_strings("dsprites")
    assert (d["train"], d["val"], d["test"]) == ("train[:589824]", "train[589824:663552]",
                                                 "train[663552:]")  # fmt: skip
    s = TT.vtab_split_strings("smallnorb")
    assert (s["val"], s["test"], s["val200"]) == ("test[:50%]", "test[50%:]", "test[:200]")
    assert TT.vtab_split_strings("kitti")["val200"] == "validation[:200]"
    meta = {n: T.task_info(n).metadata["tfds_splits"] for n in T.TFDS_SUITES["vit"]}
    assert meta["mu2net:tfds.imagenet2012"]["validation"] == "imagenet_v2:3.*.* test"
    assert meta["mu2net:tfds.cifar10"]["validation"] == "cifar10_1:1.*.* test"
    assert meta["mu2net:tfds.cifar100"]["train"] == "cifar100:3.*.* train[:98%]"
    vdd = T.task_info("tfds.visual_domain_decathlon.dtd").metadata["tfds_splits"]
    assert vdd["test"] == "visual_domain_decathlon/dtd:1.*.* validation[50%:]"
    assert (
        T.task_info("tfds.cmaterdb.telugu").metadata["tfds_splits"]["train"].endswith("train[20%:]")
    )
    assert T.task_info("tfds.mnist").metadata["tfds_splits"]["validation"].endswith("train[:5%]")


def test_vtab_label_functions():
    objects = {
        "size": tf.constant([0, 1, 1, 0, 1]),
        "shape": tf.constant([2, 0, 2, 1, 2]),
        "pixel_coords": tf.constant(
            [[0, 0, 9.2], [0, 0, 12.0], [0, 0, 9.7], [0, 0, 30.0], [0, 0, 11.0]]
        ),  # fmt: skip
    }
    fns = {k: f for k, (f, _) in TT._LABEL_FNS.items()}
    assert int(fns["clevr/count_all"]({"objects": objects})) == 2
    assert int(fns["clevr/count_cylinders"]({"objects": objects})) == 3
    assert int(fns["clevr/closest_object_distance"]({"objects": objects})) == 3  # 9.0 < 9.2
    kitti = {"objects": {"type": tf.constant([0, 5, 2, 1, 4]),
                         "location": tf.constant([[0, 0, 30.0], [0, 0, 4.0], [0, 0, 15.0],
                                                  [0, 0, 50.0], [0, 0, 7.0]])}}  # fmt: skip
    assert int(fns["kitti/closest_object_distance"](kitti)) == 0  # 4.0 m
    assert int(fns["kitti/count_vehicles"](kitti)) == 3
    assert int(fns["kitti/closest_vehicle_distance"](kitti)) == 1  # 15 m in [8, 20)
    no_vehicle = {"objects": {"type": tf.constant([5]), "location": tf.constant([[0, 0, 3.0]])}}
    assert int(fns["kitti/closest_vehicle_distance"](no_vehicle)) == 3
    assert int(fns["dsprites/label_x_position"]({"label_x_position": tf.constant(31)})) == 15
    assert int(fns["dsprites/label_orientation"]({"label_orientation": tf.constant(39)})) == 15
    assert int(fns["dsprites/label_orientation"]({"label_orientation": tf.constant(5)})) == 2


# Mock sequences have 5-50 random objects, so clevr counts can exceed the VTAB class range:
# those two tasks are checked at the base-example level (labels: test_vtab_label_functions).
_MOCK_COUNTS = ("mu2net:tfds.vtab1k.clevr.count_all", "mu2net:tfds.vtab1k.clevr.count_cylinders")


@pytest.mark.parametrize("suite", ["vit", "vtab1k"])
def test_mock_tfds_suites_preprocess(suite):
    with tfds.testing.mock_data(num_examples=2):
        for name in T.TFDS_SUITES[suite]:
            info = T.task_info(name)
            if name == "mu2net:tfds.vtab1k.kitti.closest_vehicle_distance":
                continue  # mock objects' fields get unequal random lengths; see label test
            if name in _MOCK_COUNTS:
                for ex in T.base_dataset(name, "train").as_numpy_iterator():
                    assert ex["inputs"].ndim == 3 and ex["inputs"].shape[-1] == 3
                    assert ex["inputs"].dtype == np.float32 and ex["inputs"].max() <= 1.0
                    assert ex["targets"].shape == (1,) and ex["targets"].dtype == np.int32
                continue
            splits = T.SPLITS if suite == "vit" else ("train",)
            for split in splits:
                ds = T.get_dataset(name, split, ds_hparams={"ds_image_size": 8}, train=True,
                                   seed=0, **KW)  # fmt: skip
                exs = list(ds.as_numpy_iterator())
                assert len(exs) == 2, name
                for ex in exs:
                    assert ex["inputs"].shape == (8, 8, 3) and ex["inputs"].dtype == np.float32
                    assert ex["targets"].shape == (1,) and ex["targets"].dtype == np.int32
                    assert 0 <= ex["targets"][0] < info.num_classes, name
