"""Trainer for one candidate path: steps, optimizer/schedules, partitioning, compile cache.

Heavy optional pieces (the gin binary, the t5x plug-in, the tiny test family) live in their own
modules and are not imported here.
"""

from mu2net.train.compile_cache import CompileCache, default_cache, enable_persistent_cache
from mu2net.train.optim import lr_schedule, make_optimizer
from mu2net.train.partitioning import Partitioner, default_partitioner, make_mesh
from mu2net.train.trainer import (
    CandidateResult,
    TrainConfig,
    TrainError,
    evaluate,
    predict_logits,
    split_path,
    train_candidate,
)

__all__ = [
    "CandidateResult",
    "CompileCache",
    "Partitioner",
    "TrainConfig",
    "TrainError",
    "default_cache",
    "default_partitioner",
    "enable_persistent_cache",
    "evaluate",
    "lr_schedule",
    "make_mesh",
    "make_optimizer",
    "predict_logits",
    "split_path",
    "train_candidate",
]
