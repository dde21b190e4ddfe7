"""Roots and agent classes (reference §7.2).

An *agent class* is a model family plus the architecture config of its root (for ViT the
size, e.g. ``vit(vit_size=Ti/16)``). Each class has its own root in the store; an agent
evolves only paths of its class and reads other classes' paths only when
``EvolutionConfig.agent_classes_to_load`` names them. Because no mutation changes a root's
architecture keys, a path's class is a function of its family and hparams: mixing classes in
one store never changes a path's architecture silently.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from mu2net.evolution.config import ConfigError, EvolutionConfig
from mu2net.models.base import Family, get_family
from mu2net.system.names import validate_agent_name
from mu2net.system.state import Path, System
from mu2net.system.store import Store


def class_name(family: Family, hparams: Mapping[str, Any]) -> str:
    """``family`` or ``family(key=value,...)`` from the root-defining hparams."""
    arch = family.architecture_config(hparams)
    if not arch:
        return family.name
    return f"{family.name}({','.join(f'{k}={v}' for k, v in arch.items())})"


def path_class(path: Path) -> str:
    """The agent class of a path (roots included)."""
    return class_name(get_family(path.family), path.hparams)


def config_class(config: EvolutionConfig) -> str:
    """The agent class an evolution config evolves."""
    family = get_family(config.family)
    return class_name(family, config.path_defaults(family.default_hparams()))


def class_root(system: System, config: EvolutionConfig) -> Path:
    """The root of the config's class; errors say how to create it."""
    wanted = config_class(config)
    for root in system.roots():
        if path_class(root) == wanted:
            return root
    raise ConfigError(
        f"no root of agent class {wanted!r} in the store (roots: "
        f"{sorted(path_class(r) for r in system.roots())}); `mu2net evolve` creates it"
    )


def loadable_classes(config: EvolutionConfig) -> set[str]:
    """Classes whose paths an agent of this config may use as parents."""
    return {config_class(config), *config.agent_classes_to_load}


def _root_ids(family: Family, hparams: Mapping[str, Any]) -> tuple[str, str]:
    """(path id, shard) of a class's root, a function of the class alone.

    Two agents of different classes creating their roots at once on an empty store write
    different shards, so neither can take the other's place.
    """
    arch = family.architecture_config(hparams)
    if not arch:
        return f"root:{family.name}", validate_agent_name(f"root~{family.name}")
    digest = hashlib.sha256(json.dumps(arch, sort_keys=True, default=str).encode()).hexdigest()
    return f"root:{family.name}:{digest[:8]}", validate_agent_name(
        f"root~{family.name}~{digest[:8]}"
    )


def create_root(store: Store, config: EvolutionConfig) -> Path:
    """Adds the root of the config's class (pretrained or random) to the store, once."""
    family = get_family(config.family)
    system = store.load()
    try:
        return class_root(system, config)
    except ConfigError:
        pass
    hparams = config.path_defaults(family.default_hparams())
    family.validate_hparams(hparams)
    if config.pretrained:
        params = family.load_pretrained(hparams, config.checkpoint or None)
    else:
        import jax

        params = jax.device_get(family.init(jax.random.PRNGKey(config.seed), hparams))
    pid, agent = _root_ids(family, hparams)
    root = system.add_root(pid, family.name, params, hparams, agent)
    root.metrics["pretrained"] = bool(config.pretrained)
    store.commit(system, agent, note="root")
    return root
