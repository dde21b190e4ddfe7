"""Tiny stores for the serving tests: a test_mlp root shared by many tasks, each with its head."""

import numpy as np

import mu2net.train.testing  # noqa: F401  (registers the test_mlp family)
from mu2net.system import Path, Store, System, agent_for_task

FAMILY = "test_mlp"
HP = {"num_classes": 3, "hidden_dim": 32, "ds_image_size": 8, "num_layers": 2, "adapter_layers": ""}
CLASSES = ["cat", "dog", "eel"]


def _dense(rng, d_in, d_out):
    return {
        "kernel": (rng.normal(size=(d_in, d_out)) / np.sqrt(d_in)).astype(np.float32),
        "bias": (0.1 * rng.normal(size=(d_out,))).astype(np.float32),
    }


def task_name(i):
    return f"serve:t{i}"


def build_store(url, n_tasks, seed=0):
    """Root (dense_0, dense_1, head) + ``n_tasks`` tasks sharing dense_0/dense_1, own heads."""
    rng = np.random.default_rng(seed)
    store = Store.create(url, "serve")
    s = System()
    d_in, h = HP["ds_image_size"] ** 2 * 3, HP["hidden_dim"]
    params = {
        "dense_0": _dense(rng, d_in, h),
        "dense_1": _dense(rng, h, h),
        "head": _dense(rng, h, 3),
    }
    root = s.add_root("root:test_mlp", FAMILY, params, HP, "root")
    store.commit(s, "root")
    for i in range(n_tasks):
        task = task_name(i)
        s.add_task(task, agent_for_task(task))
        publish_head(store, s, task, rng, parent=root)
    return store, s


def publish_head(store, s, task, rng, parent=None):
    """Publishes a new path for ``task``: the root's blocks and a fresh head; commits it."""
    agent = agent_for_task(task)
    base = parent or s.best_path(task)
    head = s.new_component("head", FAMILY, _dense(rng, HP["hidden_dim"], 3), agent)
    path = Path(
        s.new_id(agent, "p"),
        task,
        FAMILY,
        dict(base.components, head=head.id),
        dict(HP),
        agent,
        parent=base.id,
        metrics={"quality": float(rng.uniform(0.5, 1.0)), "class_names": CLASSES},
    )
    s.publish(path)
    store.commit(s, agent)
    return path


def batch(n, seed=0):
    size = HP["ds_image_size"]
    return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)
