"""Inference for every task of a live system: component cache, one task's predictor, serving.

``mu2net.serve.load(url, task)`` returns a :class:`TaskPredictor` that reads only that task's
path (its task index and components); :class:`PredictorPool` holds many tasks' predictors over
one :class:`ComponentCache`; :mod:`mu2net.serve.app` is the Ray Serve application (imported on
demand: it needs Ray) and :mod:`mu2net.serve.client` its Python client.
"""

from mu2net.serve.cache import ComponentCache
from mu2net.serve.errors import InputError, PayloadTooLarge, ServeError, UnknownTaskError
from mu2net.serve.inputs import read_image_files, read_text_files
from mu2net.serve.predictor import PredictorPool, TaskPredictor, load

__all__ = [
    "ComponentCache",
    "InputError",
    "PayloadTooLarge",
    "PredictorPool",
    "ServeError",
    "TaskPredictor",
    "UnknownTaskError",
    "load",
    "read_image_files",
    "read_text_files",
]
