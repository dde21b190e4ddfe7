"""TensorBoard metrics (clu metric writers) and progress bars for long loops."""

from __future__ import annotations

from typing import Any

import tqdm


def make_writer(writer_or_logdir: Any):
    """A clu ``MetricWriter``: passed through, created for a logdir string, or None."""
    if writer_or_logdir is None or not isinstance(writer_or_logdir, str | bytes):
        return writer_or_logdir
    # clu imports TensorFlow's summary ops (seconds); only pay that when logging is asked for.
    from clu import metric_writers

    return metric_writers.create_default_writer(writer_or_logdir, asynchronous=False)


def write_scalars(writer, step: int, scalars: dict[str, float]) -> None:
    """Writes scalars if a writer is set (no-op otherwise)."""
    if writer is not None:
        writer.write_scalars(int(step), {k: float(v) for k, v in scalars.items()})


def progress_bar(total: int, desc: str, enabled: bool = True) -> tqdm.tqdm:
    """A tqdm bar that is silent when disabled (and cheap to update per step)."""
    return tqdm.tqdm(total=total, desc=desc, disable=not enabled, leave=False, mininterval=0.5)
