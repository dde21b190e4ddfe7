r"""Caching base examples with seqio's Beam pipeline (DirectRunner here, Dataflow at scale).

Every mu2net task ends its seqio preprocessing with ``seqio.CacheDatasetPlaceholder()``, before
any random or hyperparameter-dependent op (those run in :mod:`mu2net.tasks.data`), so one
cache serves every generation and every ``ds_*`` setting.

Command line (seqio's own job, any Beam runner)::

    python -m seqio.scripts.cache_tasks_main --module_import=mu2net.tasks \
        --tasks='mu2net:lfw_faces,mu2net:digits' --output_cache_dir=/data/mu2net_cache \
        --pipeline_options=--runner=DirectRunner

(``--tasks`` takes regexes; escape the dots of TFDS names, e.g. ``mu2net:tfds\.dtd``.) Then
``seqio.add_global_cache_dirs(["/data/mu2net_cache"])`` (or :func:`use_cache_dir`) and
``get_dataset(..., use_cached=True)``.

From Python, :func:`cache_tasks` builds the same pipeline (seqio's ``beam_utils`` transforms:
PreprocessTask -> WriteExampleTfRecord + info + stats -> COMPLETED) without absl flags. It skips
seqio's global example reshuffle so a single-shard cache keeps the split's order: then
``use_cached=True`` yields exactly the examples, in the order, of ``use_cached=False``.
Caveat (seqio's format): the cache records one example's shape per feature, so tasks whose
native image size varies (most TFDS datasets) can only be cached after a fixed-size resize.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import seqio

from mu2net.tasks.registry import TaskError, normalize_name, task_info


def use_cache_dir(cache_dir: str) -> None:
    """Makes seqio look for cached tasks in ``cache_dir`` (idempotent)."""
    if cache_dir not in seqio.get_global_cache_dirs():
        seqio.add_global_cache_dirs([cache_dir])


def cache_tasks(
    task_names: Sequence[str],
    output_cache_dir: str,
    *,
    num_shards: int = 1,
    splits: Sequence[str] | None = None,
    overwrite: bool = False,
    pipeline_options: Sequence[str] = ("--runner=DirectRunner",),
) -> list[str]:
    """Caches the base examples of ``task_names`` under ``output_cache_dir`` with Beam.

    Args:
        task_names: Registered task names (``mu2net:`` prefix optional).
        output_cache_dir: Cache root (local path or any ``tf.io.gfile`` URL).
        num_shards: TFRecord shards per split (1 keeps the split's order).
        splits: Only these splits (default: all); reading an uncached split with
            ``use_cached=True`` then fails. Beam's fixed cost grows with the split count.
        overwrite: Rebuild a task's cache that already exists in ``output_cache_dir``.
        pipeline_options: Beam pipeline options (default: the local DirectRunner).

    Returns:
        The per-task cache directories written (already-cached tasks are skipped).

    Raises:
        TaskError: an unknown task.
    """
    import apache_beam as beam
    import tensorflow as tf
    from seqio import beam_utils

    names = [task_info(normalize_name(n)).name for n in task_names]
    tf.io.gfile.makedirs(output_cache_dir)
    written = []
    options = beam.options.pipeline_options.PipelineOptions(list(pipeline_options))
    with beam.Pipeline(options=options) as pipeline:
        for name in names:
            task = seqio.get_mixture_or_task(name)
            if not task.supports_caching:
                raise TaskError(f"Task {name!r} has no CacheDatasetPlaceholder; cannot cache")
            out = os.path.join(output_cache_dir, seqio.get_task_dir_from_name(name))
            if tf.io.gfile.exists(os.path.join(out, "COMPLETED")):
                if not overwrite:
                    continue
                tf.io.gfile.rmtree(out)
            written.append(out)
            done = []
            for split in splits or task.splits:
                if split not in task.splits:
                    raise TaskError(f"Task {name!r} has no split {split!r}")
                label = f"{name}_{split}"
                examples = pipeline | f"{label}_pat" >> beam_utils.PreprocessTask(
                    task, split, modules_to_import=["mu2net.tasks"]
                )
                done.append(
                    examples
                    | f"{label}_write"
                    >> beam_utils.WriteExampleTfRecord(
                        seqio.get_cached_tfrecord_prefix(out, split), num_shards=num_shards
                    )
                )
                done.append(
                    examples
                    | f"{label}_info" >> beam_utils.GetInfo(num_shards)
                    | f"{label}_write_info"
                    >> beam_utils.WriteJson(seqio.get_cached_info_path(out, split))
                )
                done.append(
                    examples
                    | f"{label}_stats" >> beam_utils.GetStats(task.output_features)
                    | f"{label}_write_stats"
                    >> beam_utils.WriteJson(seqio.get_cached_stats_path(out, split))
                )
            _ = (
                done
                | f"{name}_flatten" >> beam.Flatten()
                | f"{name}_discard" >> beam.Filter(lambda _: False)
                | f"{name}_completed"
                >> beam.io.textio.WriteToText(
                    os.path.join(out, "COMPLETED"),
                    append_trailing_newlines=False,
                    num_shards=1,
                    shard_name_template="",
                )
            )
    use_cache_dir(output_cache_dir)
    return written
