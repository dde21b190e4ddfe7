"""The evolve binary: ``python -m mu2net.evolution.main --gin_file=experiments/x.gin --store=DIR``.

Also ``mu2net evolve``. Flags follow t5x: ``--gin_file`` (repeatable), ``--gin_bindings``,
``--gin.KEY=VALUE``, ``--gin_search_paths``. The store is created (with the configured root)
when it does not exist yet; tasks listed with ``--add_tasks`` join the live mixture first.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from mu2net import gin_utils
from mu2net.evolution.config import EvolutionConfig
from mu2net.evolution.loop import Evolver
from mu2net.evolution.roots import create_root
from mu2net.system.names import system_name_for
from mu2net.system.store import Store, StoreError
from mu2net.train._gin import gin


def build_parser(prog: str = "mu2net evolve") -> argparse.ArgumentParser:
    """Flags of the evolve binary."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    gin_utils.add_gin_flags(p)
    p.add_argument("--store", required=True, help="system store: directory or fsspec URL")
    p.add_argument("--agent", default=None, help="shard to write (default: one shard per task)")
    p.add_argument(
        "--tasks",
        default="",
        help="comma-separated tasks this agent evolves (default: the live mixture)",
    )
    p.add_argument(
        "--add_tasks",
        default="",
        help="comma-separated tasks to add to the live mixture before evolving",
    )
    p.add_argument(
        "--continuous",
        action="store_true",
        help="keep running and pick up tasks added with `mu2net add-task`",
    )
    p.add_argument(
        "--max_task_iterations",
        type=int,
        default=0,
        help="stop after this many task iterations (0 = no limit)",
    )
    p.add_argument(
        "--logdir",
        default=None,
        help="TensorBoard dir (default: <store>/tensorboard for local stores)",
    )
    p.add_argument("--no_progress", action="store_true", help="hide progress bars")
    return p


def open_or_create(url: str, config: EvolutionConfig, system_name: str | None = None) -> Store:
    """Opens the store at ``url``, creating it with the configured root when absent."""
    try:
        store = Store.open(url)
    except StoreError:
        store = Store(url)
        if store.fs.exists(store.root) and [
            p for p in store.fs.ls(store.root, detail=False) if ".tmp-" not in p
        ]:
            raise
        store = Store.create(url, system_name_for(system_name or store.root))
    create_root(store, config)
    return store


def run(args: argparse.Namespace) -> list[dict]:
    """Runs evolution as configured by parsed ``args`` (gin already parsed)."""
    from mu2net.evolution.live import add_tasks_to_store

    config = EvolutionConfig()
    if args.continuous:
        config.continuous = True
    store = open_or_create(args.store, config)
    new_tasks = [t for t in args.add_tasks.split(",") if t]
    if new_tasks:
        add_tasks_to_store(store, new_tasks)
    logdir = args.logdir
    if logdir is None and "://" not in args.store:
        logdir = os.path.join(args.store, "tensorboard")
    evolver = Evolver(
        store,
        config,
        agent=args.agent,
        tasks=[t for t in args.tasks.split(",") if t] or None,
        logdir=logdir,
        progress=not args.no_progress,
    )
    return evolver.run(max_task_iterations=args.max_task_iterations)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(gin_utils.rewrite_gin_args(sys.argv[1:] if argv is None else argv))
    try:
        gin.clear_config()  # main() may run twice in one process (tests, notebooks)
        gin_utils.parse_gin(args)
        run(args)
    except (gin_utils.GinConfigError, ValueError, StoreError) as e:
        print(f"mu2net evolve: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
