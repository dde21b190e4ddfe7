"""The Ray Serve application on 127.0.0.1: one Ray + Serve for the module, bounded loops.

Served answers equal in-process predictions bit for bit; a newly published path answers within
the refresh bound with no error in between; 20 tasks sharing the root hold far less than 20
copies; errors get their HTTP status and name the culprit while other tasks keep answering.
"""

import io
import json
import os
import threading
import time

import numpy as np
import pytest
from serve_fixtures import CLASSES, batch, build_store, publish_head, task_name

pytest.importorskip("ray.serve")
# Opt-in until it has passed on this project's CI machines: on the loaded 2-core machine where
# it was written, Ray's raylet missed its 30 s start-up limit in every run (see the issue note).
pytestmark = pytest.mark.skipif(
    not os.environ.get("MU2NET_RAY_TESTS"), reason="set MU2NET_RAY_TESTS=1 to run the Ray tests"
)

from mu2net.serve import TaskPredictor  # noqa: E402
from mu2net.serve.client import Client, ServeClientError  # noqa: E402

N_TASKS = 20
REFRESH_S = 1.0
PORT = 18000 + os.getpid() % 1000
MAX_EXAMPLES = 64


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from mu2net.serve.app import ServeConfig, start, stop

    d = tmp_path_factory.mktemp("serve")
    store, system = build_store(str(d / "store"), N_TASKS)
    bad = publish_bad_task(store, system)
    config = ServeConfig(
        store=store.url,
        port=PORT,
        max_batch_size=8,
        batch_wait_s=0.002,
        refresh_s=REFRESH_S,
        max_examples=MAX_EXAMPLES,
        max_body_bytes=1 << 20,
        modules=("mu2net.train.testing",),
    )
    url = start(config)
    try:
        yield {"url": url, "store": store, "system": system, "client": Client(url), "bad": bad}
    finally:
        stop()


def publish_bad_task(store, system):
    """A task whose head file is damaged after the commit (checksum no longer matches)."""
    task = "serve:broken"
    system.add_task(task, "serve~broken")
    path = publish_head(store, system, task, np.random.default_rng(99), parent=system.roots()[0])
    rec = system.component(path.components["head"]).record
    f = os.path.join(store.url.replace("file://", ""), "shards", rec["shard"], rec["file"])
    data = bytearray(open(f, "rb").read())
    data[-5] ^= 0xFF
    open(f, "wb").write(bytes(data))
    return {"task": task, "file": rec["file"]}


def test_served_predictions_equal_in_process_for_every_task(served):
    client = served["client"]
    x = batch(5, seed=1)
    for i in range(N_TASKS):
        task = task_name(i)
        local = TaskPredictor.load(served["store"].url, task)
        labels, probs = local.predict(task, x)
        got = client.predict(task, inputs=x)
        assert got.path_id == local.path_id
        assert got.labels.tolist() == labels.tolist()
        assert got.probabilities.tobytes() == probs.astype(np.float32).tobytes(), task
        assert got.classes == [CLASSES[k] for k in labels]
    listed = {t["task"]: t for t in client.tasks()}
    assert set(listed) == {task_name(i) for i in range(N_TASKS)} | {served["bad"]["task"]}
    assert listed[task_name(0)]["params"] > 0 and listed[task_name(0)]["quality"] > 0


def test_served_images_equal_in_process(served):
    from PIL import Image

    rng = np.random.default_rng(3)
    pngs = []
    for shape in [(11, 9, 3), (8, 8), (30, 20, 4)]:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(buf, "PNG")
        pngs.append(buf.getvalue())
    task = task_name(3)
    local = TaskPredictor.load(served["store"].url, task)
    from mu2net.serve.inputs import decode_image

    labels, probs = local.predict(task, local.prepare([decode_image(p) for p in pngs]))
    got = served["client"].predict(task, images=pngs)
    assert got.labels.tolist() == labels.tolist()
    assert got.probabilities.tobytes() == probs.tobytes()


def test_twenty_tasks_share_the_root_once(served):
    client = served["client"]
    for i in range(N_TASKS):
        client.predict(task_name(i), inputs=batch(1))
    stats = client.stats()
    assert len(stats["paths"]) >= N_TASKS
    # 2 shared blocks + 20 heads held, against 20 full copies of the paths.
    ratio = stats["bytes"] / stats["path_bytes_sum"]
    assert ratio < 0.15, stats
    assert stats["components"] == 2 + N_TASKS, stats


def _status(client, task, body):
    try:
        client.predict_body(task, body)
    except ServeClientError as e:
        return e.status, str(e), e.body
    return 200, "", {}


def test_error_answers_name_the_culprit(served):
    client, bad = served["client"], served["bad"]
    good = task_name(1)
    status, msg, body = _status(
        client, "serve:nope", json.dumps({"inputs": batch(1).tolist()}).encode()
    )
    assert status == 404 and "serve:nope" in msg and good in body["known_tasks"]
    assert _status(client, good, b"{not json")[0] == 400
    assert _status(client, good, b'{"pixels": [1]}')[0] == 400
    status, msg, _ = _status(
        client, good, json.dumps({"inputs": np.zeros((1, 4, 4, 3)).tolist()}).encode()
    )
    assert status == 400 and "(4, 4, 3)" in msg and "(8, 8, 3)" in msg
    x = batch(2)
    x[1, 0, 0, 0] = np.nan
    status, msg, _ = _status(client, good, json.dumps({"inputs": x.tolist()}).encode())
    assert status == 400 and "NaN" in msg
    status, msg, _ = _status(client, good, json.dumps({"texts": ["a cat"]}).encode())
    assert status == 400 and "takes images" in msg
    status, msg, _ = _status(client, good, json.dumps({"images": ["aGVsbG8="]}).encode())
    assert status == 400 and "not a readable image" in msg
    many = json.dumps({"inputs": batch(MAX_EXAMPLES + 1).tolist()}).encode()
    assert _status(client, good, many)[0] == 413
    assert _status(client, good, b"[" + b"0," * (1 << 20) + b"0]")[0] == 413
    status, msg, _ = _status(
        client, bad["task"], json.dumps({"inputs": batch(1).tolist()}).encode()
    )
    assert status == 500 and bad["file"] in msg and "checksum" in msg
    assert client.predict(good, inputs=batch(1)).task == good  # the replica keeps serving
    assert client.healthz()


def test_live_update_answers_old_or_new_never_an_error(served):
    client, store, system = served["client"], served["store"], served["system"]
    task = task_name(0)
    old = client.predict(task, inputs=batch(2)).path_id
    seen, errors, stop = [], [], threading.Event()

    def loop():
        deadline = time.monotonic() + 90
        for _ in range(2000):  # bounded in count and time
            if stop.is_set() or time.monotonic() > deadline:
                return
            try:
                seen.append((time.monotonic(), client.predict(task, inputs=batch(2)).path_id))
            except Exception as e:  # noqa: BLE001 - recorded, the test fails on any
                errors.append(e)

    worker = threading.Thread(target=loop)
    worker.start()
    time.sleep(0.5)
    new = publish_head(store, system, task, np.random.default_rng(7)).id
    published = time.monotonic()
    bound = REFRESH_S + 30.0  # refresh period plus loading and compiling on a loaded machine
    while time.monotonic() - published < bound and not any(p == new for _, p in seen):
        time.sleep(0.1)
    time.sleep(0.5)
    stop.set()
    worker.join(timeout=60)
    assert not errors, errors[:3]
    ids = [p for _, p in seen]
    assert set(ids) <= {old, new}, set(ids)
    first_new = next(t for t, p in seen if p == new)
    assert first_new - published < bound
    assert all(p == new for t, p in seen if t > first_new)  # one replica: never back to old
