r"""`mu2net train`: trains one path of a root family on one task (a t5x-style gin binary).

    python -m mu2net.train.main --gin_file=models/vit_test.gin \
        --gin.TASK="'mu2net:digits'" --gin.MODEL_DIR="'/tmp/run'"

Flags follow t5x: ``--gin_file`` (repeatable; looked up in ``--gin_search_paths``, the working
directory and the configs shipped in ``mu2net.gin``, so no source checkout is needed),
``--gin_bindings`` (repeatable) and the ``--gin.KEY=VALUE`` shorthand. ``runs/train.gin`` is
always parsed first; it declares the required macros (TASK, FAMILY, MODEL_DIR).

The binary loads the family root (pretrained or fresh), makes a path (every component trainable
= fine-tune, or ``train_path.frozen_components`` frozen), trains it with
:func:`mu2net.train.trainer.train_candidate`, evaluates the test split, and writes into MODEL_DIR:
``result.json``, ``operative_config.gin`` and ``params.safetensors`` (keys ``component/leaf/...``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from mu2net import gin_utils
from mu2net.errors import Mu2netError
from mu2net.models.base import Family, FamilyError, get_family, shape_signature
from mu2net.train._gin import gin
from mu2net.train.batching import eval_batches, validation_batches
from mu2net.train.trainer import TrainConfig, TrainError, evaluate, split_path, train_candidate

REQUIRED_MACROS = ("TASK", "FAMILY", "MODEL_DIR")
DEFAULT_GIN_FILE = "runs/train.gin"


class TrainBinaryError(Mu2netError, ValueError):
    """Bad input to the train binary: names the gin key, task, split or component."""


@dataclasses.dataclass
class TaskData:
    """What the binary trains and evaluates on (built by a data provider)."""

    num_classes: int
    train_batches: Iterator[Mapping[str, np.ndarray]]
    validation_batches: list[Mapping[str, np.ndarray]]
    test_batches: list[Mapping[str, np.ndarray]]
    train_size: int | None = None
    name: str = ""


@gin.configurable
def seqio_task_data(
    task: str,
    *,
    family: Family,
    hparams: Mapping[str, Any],
    batch_size: int,
    seed: int,
    validation_examples: int = 5120,
    use_cached: bool = False,
) -> TaskData:
    """Train/validation/test data of a registered seqio task (``mu2net.tasks.data``)."""
    import mu2net.tasks  # noqa: F401  (registers the bundled tasks)
    from mu2net.tasks import data as task_data

    info = task_data.task_info(task)
    sizes = info.split_sizes
    for split in ("train", "validation", "test"):
        if split in sizes and sizes[split] == 0:
            raise TrainBinaryError(f"task {info.name!r} has no {split!r} examples")
    if "validation" not in sizes:
        raise TrainBinaryError(f"task {info.name!r} has no 'validation' split (needed for §4.5)")
    check_batch_size(info.name, batch_size, sizes.get("train"))
    ds = {k: v for k, v in hparams.items() if k.startswith("ds_")}
    common = dict(
        ds_hparams=ds,
        pixel_mean=family.pixel_mean,
        pixel_std=family.pixel_std,
        use_cached=use_cached,
    )
    train = task_data.numpy_batches(
        task,
        "train",
        batch_size=batch_size,
        train=True,
        seed=seed,
        repeat=True,
        drop_remainder=True,
        **common,
    )
    val = task_data.load_split(task, "validation", max_examples=validation_examples, **common)
    test = task_data.load_split(task, "test", **common)
    return TaskData(
        info.num_classes,
        train,
        validation_batches(val, batch_size, validation_examples),
        eval_batches(test, batch_size),
        sizes.get("train"),
        info.name,
    )


def check_batch_size(task: str, batch_size: int, train_size: int | None) -> None:
    """Raises naming ``TrainConfig.batch_size`` when it exceeds the train split."""
    if train_size is not None and batch_size > int(train_size):
        raise TrainBinaryError(
            f"TrainConfig.batch_size={batch_size} is larger than task {task!r}'s train split "
            f"({train_size} examples)"
        )


def build_path_params(
    family: Family,
    hparams: Mapping[str, Any],
    pretrained: bool,
    checkpoint: str | None,
    seed: int,
) -> dict[str, Any]:
    """Root components (pretrained where shapes fit the task) plus fresh ones (e.g. the head)."""
    fresh = family.init(jax.random.PRNGKey(seed), hparams)
    if not pretrained:
        return fresh
    root = family.load_pretrained(hparams, checkpoint)
    out = {}
    for name, params in fresh.items():
        if name in root and shape_signature(root[name]) == shape_signature(params):
            out[name] = root[name]
        elif family.fresh_allowed(name, hparams):
            out[name] = params
        else:
            raise TrainBinaryError(
                f"component {name!r} of the pretrained {family.name!r} root does not fit "
                f"hparams {dict(hparams)} and cannot be initialised afresh"
            )
    return out


def flatten_params(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``{'component/leaf/...': array}`` for safetensors."""
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(dict(params))[0]:
        key = "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)
        flat[key] = np.ascontiguousarray(np.asarray(leaf))
    return flat


@gin.configurable
def train_path(
    *,
    task: str = gin.REQUIRED,
    family: str = gin.REQUIRED,
    model_dir: str = gin.REQUIRED,
    hparams: Mapping[str, Any] | None = None,
    pretrained: bool = True,
    checkpoint: str | None = None,
    frozen_components: Sequence[str] = (),
    data_provider: Callable[..., TaskData] = seqio_task_data,
    logdir: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Trains and tests one path; writes result.json, operative_config.gin, params.safetensors.

    Args:
      task: registered task name (e.g. ``mu2net:digits``).
      family: registered model family name (``vit``, ``efficientnet_lite0``, ``bert``...).
      model_dir: output directory (created).
      hparams: overrides of the family's default hparams (architecture, ``opt_*``, ``ds_*``).
      pretrained: start from the family's pretrained root (else a fresh init).
      checkpoint: pretrained checkpoint path (family default if None).
      frozen_components: components kept frozen; everything else trains (fine-tune = none).
      data_provider: ``f(task, *, family, hparams, batch_size, seed) -> TaskData``.
      logdir: TensorBoard directory (default ``MODEL_DIR/tb``; ``''`` disables).
      progress: show a progress bar.
    """
    config = TrainConfig()
    fam = get_family(family)
    hp = {**fam.default_hparams(), **dict(hparams or {})}
    data = data_provider(
        task, family=fam, hparams=hp, batch_size=config.batch_size, seed=config.seed
    )
    check_batch_size(data.name or task, config.batch_size, data.train_size)
    if not data.validation_batches:
        raise TrainBinaryError(f"task {task!r} has no validation examples (needed for §4.5)")
    hp["num_classes"] = int(data.num_classes)
    fam.validate_hparams(hp)
    params = build_path_params(fam, hp, pretrained, checkpoint, config.seed)
    unknown = sorted(set(frozen_components) - set(params))
    if unknown:
        raise TrainBinaryError(
            f"train_path.frozen_components: unknown components {unknown} for family "
            f"{fam.name!r}; the path has {list(params)}"
        )
    trainable, frozen = split_path(params, [n for n in params if n not in set(frozen_components)])
    os.makedirs(model_dir, exist_ok=True)
    writer = os.path.join(model_dir, "tb") if logdir is None else (logdir or None)
    result = train_candidate(
        family=fam, hparams=hp, trainable=trainable, frozen=frozen,
        train_batches=data.train_batches, validation_batches=data.validation_batches,
        config=config, writer=writer, progress=progress,
    )  # fmt: skip
    summary = {
        "task": task, "family": fam.name, "hparams": hp, "pretrained": pretrained,
        "trainable": sorted(trainable), "frozen": sorted(frozen),
        "improved": result.improved, "failed": result.failed,
        "failure_reason": result.failure_reason, "validation_accuracy": result.quality,
        "evals": result.evals, "steps": result.steps, "examples_seen": result.examples_seen,
        "trainable_params": result.trainable_params, "timings": result.timings,
        "num_compiles": result.num_compiles, "config": dataclasses.asdict(config),
    }  # fmt: skip
    if result.improved:
        best = {**frozen, **result.best_trainable}
        summary["test_accuracy"], _ = evaluate(fam, hp, best, data.test_batches)
        from safetensors.numpy import save_file

        save_file(flatten_params(best), os.path.join(model_dir, "params.safetensors"))
    with open(os.path.join(model_dir, "result.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    with open(os.path.join(model_dir, "operative_config.gin"), "w") as f:
        f.write(gin.operative_config_str())
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the binary on ``argv`` (without the program name); returns the exit code."""
    parser = argparse.ArgumentParser(prog="mu2net train", description=__doc__.splitlines()[0])
    gin_utils.add_gin_flags(parser)
    args = parser.parse_args(gin_utils.rewrite_gin_args(sys.argv[1:] if argv is None else argv))
    if DEFAULT_GIN_FILE not in args.gin_file:
        args.gin_file.insert(0, DEFAULT_GIN_FILE)
    gin.clear_config()
    try:
        gin_utils.parse_gin(args, finalize=False)
        gin_utils.check_required_macros(REQUIRED_MACROS, DEFAULT_GIN_FILE)
        gin.finalize()
        summary = train_path()
    except (gin_utils.GinConfigError, TrainBinaryError, TrainError, FamilyError) as e:
        print(f"mu2net train: error: {e}", file=sys.stderr)
        return 2
    except (TypeError, ValueError) as e:
        # User-facing errors: ours (tasks, families...) and gin's call-time binding errors,
        # which name the configurable and key. Anything else is a bug: keep the traceback.
        if type(e).__module__.startswith("mu2net") or "configurable" in str(e):
            print(f"mu2net train: error: {e}", file=sys.stderr)
            return 2
        raise
    status = "FAILED: " + str(summary["failure_reason"]) if summary["failed"] else "ok"
    print(
        f"mu2net train: {status}; validation {summary['validation_accuracy']}, "
        f"test {summary.get('test_accuracy')}; wrote {summary['task']} path to "
        f"{gin.query_parameter('%MODEL_DIR')}"
    )
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
