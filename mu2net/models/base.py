"""The model-family interface: how a network's layers become components and back.

A *family* (ViT, EfficientNet-Lite0, BERT/MiniLM, ...) maps between a mapping
``component name -> parameter pytree`` and a runnable flax model. The system and the trainer
only ever talk to a family through this interface, so adding a family is one new module that
subclasses :class:`Family` and calls :func:`register_family`.

Hyperparameters (``hparams``) are a flat ``dict`` of gin-style keys shared with the evolution
layer (reference §3.1): ``num_classes``, ``num_layers``, ``adapter_layers`` (sorted block
indices joined by ``_``, e.g. ``"0_3"``; ``""`` for none), ``adapter_dim``, ``ds_image_size``,
``ds_max_length`` (text), plus family-specific keys declared in :meth:`Family.default_hparams`.
"""

from __future__ import annotations

import abc
import difflib
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mu2net.errors import Mu2netError

Params = Any  # a pytree of arrays (nested dicts, flax style)
ParamsByComponent = Mapping[str, Params]


class PrefixPart(NamedTuple):
    """One independent part of a frozen prefix (see :meth:`Family.prefix_parts`).

    Attributes:
      key: what the part computes, apart from its params (family, hparams, input handling).
      select: the full params -> the part's own params, named independently of where the part
        sits (so the same part in two places has the same params).
      apply: (own params, inputs) -> the part's output (a compiled function).
    """

    key: str
    select: Callable[[ParamsByComponent], dict[str, Params]]
    apply: Callable[[dict[str, Params], jax.Array], jax.Array]


class FamilyError(Mu2netError, ValueError):
    """Bad input to a model family (unknown family, checkpoint key, shape, adapter index...)."""


def parse_adapter_layers(value: str | Sequence[int] | None) -> tuple[int, ...]:
    """Parses ``adapter_layers`` (``"0_3"``, ``""``, a list of ints or None) into sorted indices."""
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        try:
            items = [int(v) for v in value.split("_")]
        except ValueError as e:
            raise FamilyError(f"adapter_layers={value!r}: expected indices joined by '_'") from e
    else:
        items = [int(v) for v in value]
    return tuple(sorted(set(items)))


def format_adapter_layers(indices: Sequence[int]) -> str:
    """Inverse of :func:`parse_adapter_layers`."""
    return "_".join(str(i) for i in sorted(set(indices)))


def num_params(params: Params) -> int:
    """Number of scalars in a parameter pytree."""
    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))


def shape_signature(params: Params) -> str:
    """A stable string of the pytree's paths, shapes and dtypes (equal iff interchangeable).

    Works on arrays and on ``jax.ShapeDtypeStruct`` trees (from ``jax.eval_shape``).
    """
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    parts = [f"{jax.tree_util.keystr(p)}:{tuple(np.shape(x))}:{_dtype(x)}" for p, x in leaves]
    return ";".join(parts)


def _dtype(x: Any) -> np.dtype:
    # ShapeDtypeStructs (from jax.eval_shape) and arrays both carry .dtype; avoid materialising.
    return np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype


def check_checkpoint_keys(
    state_dict: Mapping[str, Any],
    expected: Mapping[str, tuple[int, ...]],
    source: str,
    ignore: Any = lambda key: False,
) -> None:
    """Raises :class:`FamilyError` naming ``source`` and the first bad checkpoint key.

    A mis-shaped tensor is reported before a missing one (the more specific diagnosis), then
    unexpected keys (those ``ignore(key)`` does not excuse).
    """
    for key, shape in expected.items():
        got = tuple(np.shape(state_dict[key])) if key in state_dict else shape
        if got != shape:
            raise FamilyError(f"{source}: key {key!r} has shape {got}, expected {shape}")
    for key, shape in expected.items():
        if key not in state_dict:
            raise FamilyError(f"{source}: missing key {key!r} (expected shape {shape})")
    extra = [k for k in state_dict if k not in expected and not ignore(k)]
    if extra:
        raise FamilyError(f"{source}: unexpected key {extra[0]!r} ({len(extra)} unexpected)")


class Family(abc.ABC):
    """A model family: components <-> a flax module.

    Subclasses set :attr:`name` and :attr:`modality` and implement the abstract methods.
    Input conventions: image families take ``float32 [B, H, W, 3]`` already scaled with
    :attr:`pixel_mean` / :attr:`pixel_std` (applied by the task preprocessing to pixels in
    ``[0, 1]``); text families take ``int32 [B, T]`` token ids with 0 as padding.
    """

    name: ClassVar[str]
    modality: ClassVar[str] = "image"  # "image" or "text"
    pixel_mean: ClassVar[tuple[float, float, float]] = (0.5, 0.5, 0.5)
    pixel_std: ClassVar[tuple[float, float, float]] = (0.5, 0.5, 0.5)
    # Hparam keys whose value changes parameter shapes or the computation graph.
    shape_keys: ClassVar[tuple[str, ...]] = (
        "num_classes",
        "num_layers",
        "adapter_layers",
        "adapter_dim",
        "ds_image_size",
    )
    # Components that evolution always clones (reference: the final norm is part of the head).
    force_clone: ClassVar[tuple[str, ...]] = ()
    supports_adapters: ClassVar[bool] = True
    # Whether the function-preserving transformer expansions (models/expansions.py) apply.
    supports_expansions: ClassVar[bool] = False
    # The task-specific output component: never shared with, nor inherited from, another task.
    head_name: ClassVar[str] = "head"
    # Prefix of the stacked blocks' names (``<prefix><index>``), for depth-based rules.
    block_prefix: ClassVar[str] = "block_"
    # Components after the block stack that train together with the top blocks.
    above_blocks: ClassVar[tuple[str, ...]] = ()

    def block_index(self, name: str) -> int | None:
        """Index of block component ``name`` in the stack, or None for any other component."""
        rest = name[len(self.block_prefix) :] if name.startswith(self.block_prefix) else ""
        return int(rest) if rest.isdigit() else None

    def architecture_config(self, hparams: Mapping[str, Any]) -> dict[str, Any]:
        """The root-defining architecture hparams (an agent class evolves one such root)."""
        return {k: hparams[k] for k in sorted(self.root_keys) if k in hparams}

    # Hparams that identify a root architecture of this family (e.g. the ViT size).
    root_keys: ClassVar[tuple[str, ...]] = ()

    @abc.abstractmethod
    def default_hparams(self) -> dict[str, Any]:
        """Default hyperparameters of this family (architecture keys included)."""

    @abc.abstractmethod
    def component_names(self, hparams: Mapping[str, Any]) -> list[str]:
        """Ordered component names of a path with these hparams (input side first, head last)."""

    @abc.abstractmethod
    def init(self, rng: jax.Array, hparams: Mapping[str, Any]) -> dict[str, Params]:
        """Fresh parameters for every component (heads and adapter outputs zero-initialised)."""

    @abc.abstractmethod
    def apply(
        self, params: ParamsByComponent, inputs: jax.Array, hparams: Mapping[str, Any]
    ) -> jax.Array:
        """Logits ``[B, num_classes]`` for ``inputs``; ``params`` maps every component name."""

    @abc.abstractmethod
    def load_pretrained(
        self, hparams: Mapping[str, Any], path: str | None = None
    ) -> dict[str, Params]:
        """Pretrained root parameters by component (``path`` = checkpoint, or the bundled one)."""

    def dummy_inputs(self, hparams: Mapping[str, Any], batch_size: int = 1) -> np.ndarray:
        """An all-zeros input batch with the shape and dtype :meth:`apply` expects."""
        if self.modality == "text":
            length = int(hparams.get("ds_max_length", 64))
            return np.zeros((batch_size, length), np.int32)
        size = int(hparams["ds_image_size"])
        return np.zeros((batch_size, size, size, 3), np.float32)

    def prepare_inputs(self, raw: Sequence[Any], hparams: Mapping[str, Any]) -> np.ndarray:
        """The batch :meth:`apply` expects from raw examples, as the eval pipeline makes it.

        Image families take decoded images (``[H, W]`` or ``[H, W, 1|3|4]``, 8-bit pixels):
        scaled to ``[0, 1]``, resized to ``ds_image_size`` as ``tf.image.resize`` does (bilinear,
        aspect ratio not kept) and normalised with :attr:`pixel_mean` / :attr:`pixel_std`. Text
        families override this to tokenise strings.

        Raises:
            FamilyError: raw examples of the wrong modality, rank or size.
        """
        from mu2net.models.raw_inputs import RawInputError, images_to_inputs

        if any(isinstance(r, str | bytes) for r in raw):
            raise FamilyError(f"family {self.name!r} takes images, got text")
        try:
            return images_to_inputs(
                raw, int(hparams["ds_image_size"]), self.pixel_mean, self.pixel_std
            )
        except RawInputError as e:
            raise FamilyError(f"family {self.name!r}: {e}") from None

    def adapt_component(
        self,
        name: str,
        params: Params,
        old_hparams: Mapping[str, Any],
        new_hparams: Mapping[str, Any],
    ) -> Params | None:
        """Converts an ancestor's component to new hparams (e.g. posembed to a new image size).

        Returns None when no function-preserving conversion exists; evolution then looks
        further up the lineage or initialises the component afresh.
        """
        del name, params, old_hparams, new_hparams
        return None

    def fresh_allowed(self, name: str, hparams: Mapping[str, Any]) -> bool:
        """Whether evolution may create ``name`` from a fresh init (heads, adapters, new blocks)."""
        del hparams
        return name == "head" or name.startswith("residual_adapter_")

    def stages(self, hparams: Mapping[str, Any]) -> list[tuple[str, ...]] | None:
        """Components grouped into stages applied in sequence, or None if not staged.

        The output of stage i is the input of stage i + 1 (the last stage returns logits).
        Evolution uses it to cache the activations of a frozen prefix once per generation.
        """
        del hparams
        return None

    def apply_stages(
        self,
        params: ParamsByComponent,
        inputs: jax.Array,
        hparams: Mapping[str, Any],
        start: int,
        stop: int | None = None,
    ) -> jax.Array:
        """Applies stages ``start..stop-1`` (see :meth:`stages`) to ``inputs``."""
        raise FamilyError(f"family {self.name!r} does not support staged application")

    def prefix_parts(self, hparams: Mapping[str, Any], stop: int) -> list[PrefixPart] | None:
        """Stages ``0..stop-1`` as independent parts, or None when they are one piece.

        The parts' outputs, concatenated on the last axis, are ``apply_stages(..., 0, stop)``.
        A frozen-prefix cache keeps each part's activations on its own, so a part shared by
        two prefixes (a sub-path of two composite paths) runs once per example.
        """
        del hparams, stop
        return None

    def architecture_key(self, hparams: Mapping[str, Any]) -> tuple:
        """Hashable key of everything that changes shapes or the graph (for compile caches)."""
        return (self.name,) + tuple((k, str(hparams.get(k))) for k in self.shape_keys)

    def flops(self, hparams: Mapping[str, Any]) -> float:
        """FLOPs of one forward pass on one example (XLA cost analysis; cached)."""
        return _cached_flops(self, self.architecture_key(hparams), freeze_hparams(hparams))

    def validate_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Raises :class:`FamilyError` naming the key when hparams are inconsistent."""
        layers = parse_adapter_layers(hparams.get("adapter_layers", ""))
        if layers and not self.supports_adapters:
            raise FamilyError(f"family {self.name!r} has no residual adapters (adapter_layers)")
        n = int(hparams.get("num_layers", 0))
        for i in layers:
            if not 0 <= i < n:
                raise FamilyError(
                    f"adapter_layers: index {i} out of range for num_layers={n} "
                    f"(family {self.name!r})"
                )


def freeze_hparams(hparams: Mapping[str, Any]) -> tuple:
    """The scalar hparams as a sorted tuple: a hashable key for caches of compiled functions."""
    return tuple(sorted((k, v) for k, v in hparams.items() if not isinstance(v, dict | list)))


@functools.lru_cache(maxsize=256)
def _cached_flops(family: Family, arch_key: tuple, frozen_hparams: tuple) -> float:
    del arch_key  # part of the cache key only
    hparams = dict(frozen_hparams)
    params = jax.eval_shape(lambda: family.init(jax.random.PRNGKey(0), hparams))
    inputs = family.dummy_inputs(hparams, batch_size=1)
    params = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), params)
    compiled = jax.jit(lambda p, x: family.apply(p, x, hparams)).lower(params, inputs).compile()
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", 0.0))


def apply_split(
    family: Family,
    trainable: ParamsByComponent,
    frozen: ParamsByComponent,
    inputs: jax.Array,
    hparams: Mapping[str, Any],
) -> jax.Array:
    """Applies a path whose params are split into a trainable and a frozen part.

    Differentiate w.r.t. ``trainable`` only: frozen components enter as constants, so no
    gradient (and no optimizer update) can ever reach them.
    """
    overlap = set(trainable) & set(frozen)
    if overlap:
        raise FamilyError(f"components both trainable and frozen: {sorted(overlap)}")
    return family.apply({**frozen, **trainable}, inputs, hparams)


_REGISTRY: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Registers a family instance under ``family.name`` (the name gin and the store use)."""
    if family.name in _REGISTRY and type(_REGISTRY[family.name]) is not type(family):
        raise FamilyError(f"family {family.name!r} is already registered")
    _REGISTRY[family.name] = family
    return family


def get_family(name: str) -> Family:
    """Returns the registered family ``name``; the error suggests close names."""
    from mu2net import models  # noqa: F401  (importing registers the bundled families)

    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f"; did you mean {close}?" if close else f"; known: {sorted(_REGISTRY)}"
        raise FamilyError(f"unknown model family {name!r}{hint}")
    return _REGISTRY[name]


def family_names() -> list[str]:
    """Names of all registered families."""
    from mu2net import models  # noqa: F401

    return sorted(_REGISTRY)
