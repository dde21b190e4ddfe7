"""The ``mu2net`` command: a thin layer that parses arguments and calls the library.

Verbs: init, add-task, evolve, status, verify, eval, predict, report, train, cache-tasks, demo.
Usage errors exit with code 2 (argparse); failures of the work itself exit with 1 and one
line that names the culprit. ``status`` imports neither TensorFlow nor seqio.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from mu2net.errors import Mu2netError
from mu2net.text_table import table

DEFAULT_EXPERIMENT = "experiments/default.gin"


class CliError(Mu2netError):
    """A failure to report in one line with exit code 1."""


# ------------------------------------------------------------------------------ verbs
def cmd_init(args: argparse.Namespace) -> None:
    """Creates a store with the configured root."""
    from mu2net import gin_utils
    from mu2net.evolution.config import EvolutionConfig
    from mu2net.evolution.roots import create_root
    from mu2net.system.names import system_name_for
    from mu2net.system.store import Store

    if not args.gin_file:
        args.gin_file = [DEFAULT_EXPERIMENT]
    gin_utils.parse_gin(args)
    store = Store.create(args.store, args.name or system_name_for(args.store))
    root = create_root(store, EvolutionConfig())
    print(
        f"created system {store.system_name!r} at {args.store} with root {root.task} "
        f"({len(root.components)} components)"
    )


def cmd_add_task(args: argparse.Namespace) -> None:
    """Adds tasks to the live mixture."""
    from mu2net.evolution.live import add_tasks_to_store
    from mu2net.mixtures import expand_task_names
    from mu2net.system.store import Store

    _import_modules(args.module)
    system = add_tasks_to_store(Store.open(args.store), expand_task_names(args.tasks))
    print(f"live mixture now has {len(system.tasks)} task(s): {', '.join(system.tasks)}")


def cmd_evolve(args: argparse.Namespace) -> None:
    """Runs evolution, then prints the status."""
    from mu2net import gin_utils
    from mu2net.evolution import main as evolve_main
    from mu2net.evolution.config import EvolutionConfig
    from mu2net.system import lease
    from mu2net.system.names import agent_for_task

    _import_modules(args.module)
    gin_utils.parse_gin(args)
    store = evolve_main.open_or_create(args.store, EvolutionConfig())
    if args.agent:
        shards = [args.agent]
    else:  # one shard per task: the tasks it will evolve, known now (more are leased on commit)
        tasks = [t for t in args.tasks.split(",") if t] or store.load().tasks
        shards = [agent_for_task(t) for t in tasks + [t for t in args.add_tasks.split(",") if t]]
    with lease.hold(
        store, shards, ttl_s=args.lease_ttl_s, wait=args.wait_for_lease, auto=not args.agent
    ):
        summaries = evolve_main.run(args)
    print(f"{len(summaries)} task iteration(s) done")
    cmd_status(args)


def cmd_status(args: argparse.Namespace) -> None:
    """Prints the system's tasks, paths, quality by each task's metric, sharing (no TensorFlow).

    ``metric`` names the path's validation metric (its ``quality_metric``, the scorer's) and,
    when it differs, the test metric (the task's primary metric) as ``val/test``.
    """
    from mu2net.evolution.budget import compute_by_task
    from mu2net.system.store import Store

    store = Store.open(args.store)
    system = store.load()
    compute = compute_by_task(store.history())
    rows = []
    for p in system.task_paths():
        comps = system.path_components(p)
        shared = sum(1 for c in comps.values() if len(c.locks) > 1)
        spent = compute.get(p.task, {})
        rows.append(
            [
                p.task,
                p.id,
                _fmt(p.metrics.get("quality")),
                _fmt(p.metrics.get("test_quality")),
                f"{system.accounted_params(p):,.0f}",
                f"{system.path_params(p):,}",
                f"{shared}/{len(comps)}",
                str(p.metrics.get("task_iterations", 0)),
                f"{spent.get('flops', 0.0) / 1e12:,.2f}",
                f"{spent.get('seconds', 0.0):,.0f}",
                _metric_names(p.metrics),
            ]
        )
    waiting = [t for t in system.tasks if system.best_path(t) is None]
    print(
        f"system {store.system_name!r} at {args.store}: {len(system.tasks)} task(s), "
        f"{len(system.roots())} root(s), {len(system.components)} components, "
        f"{system.total_params():,} params in use"
    )
    print(
        table(
            [
                "task",
                "path",
                "val",
                "test",
                "accounted params",
                "path params",
                "shared",
                "iters",
                "TFLOPs",
                "seconds",
                "metric",
            ],  # fmt: skip
            rows,
        )
    )
    if waiting:
        print(f"waiting for a first task iteration: {', '.join(waiting)}")
    last = max((store.latest_manifest(a) or {}).get("created", 0) for a in store.shards())
    if last:
        print(f"last commit: {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(last))}")
    print(_verify_line(store))
    for line in _lease_lines(store):
        print(line)


def _metric_names(metrics: dict) -> str:
    """``accuracy`` or ``val_metric/test_metric`` when selection and test metrics differ."""
    val = metrics.get("quality_metric") or "accuracy"
    test = metrics.get("test_metric") or val
    return val if val == test else f"{val}/{test}"


def _lease_lines(store) -> list[str]:
    from mu2net.system import lease

    lines = []
    for agent in store.shards():
        _, body = lease.current(store, agent)
        if lease.is_live(body):
            lines.append(f"shard {agent!r} is being evolved: held by {lease.describe(body)}")
    return lines


def _verify_line(store) -> str:
    from mu2net.system.verify import last_result

    rec = last_result(store)
    if rec is None:
        return "last verify: never (run `mu2net verify --store URL`)"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rec["finished"]))
    result = "OK" if rec.get("ok") else f"{rec.get('faults')} fault(s)"
    return (
        f"last verify: {when}: {result} ({rec.get('files')} files, {rec.get('seconds', 0):.1f} s)"
    )


def cmd_verify(args: argparse.Namespace) -> None:
    """Scrubs every file the latest state references; non-zero exit on any fault."""
    from mu2net.system.store import Store
    from mu2net.system.verify import record_result, verify_store

    store = Store.open(args.store)
    report = verify_store(store, repair=args.repair)
    for path in report.repaired:
        print(f"repaired: {path}")
    for fault in report.faults:
        print(fault.line())
    record_result(store, report)
    print(report.summary())
    if not report.ok:
        raise CliError(f"{len(report.faults)} fault(s) in store {args.store} (listed above)")


def cmd_eval(args: argparse.Namespace) -> None:
    """Evaluates published paths on a split."""
    from mu2net.evolution.evaluation import evaluate_tasks
    from mu2net.system.store import Store

    _import_modules(args.module)
    store = Store.open(args.store)
    system = store.load()
    tasks = args.tasks or [p.task for p in system.task_paths()]
    results = evaluate_tasks(system, tasks, split=args.split)
    rows = []
    for t, r in results.items():
        others = ", ".join(f"{k}={v:.4f}" for k, v in r["metrics"].items() if k != r["metric"])
        row = [t, r["metric"], f"{r['value']:.4f}", str(r["examples"]), _fmt(r["recorded"])]
        rows.append([*row, others or "-"])
    print(table(["task", "metric", args.split, "examples", "recorded", "other metrics"], rows))


def cmd_predict(args: argparse.Namespace) -> None:
    """Predicts with one task's path on files or a .npy batch."""
    import numpy as np

    from mu2net.serve import TaskPredictor
    from mu2net.system.store import Store

    if not args.npy and not args.files:
        raise CliError("give input files or --npy BATCH.npy")
    store = Store.open(args.store)
    system = store.load_task(args.task)  # one index file, not every shard's manifest
    files0, bytes0 = store.files_read, store.bytes_read  # count component reads only
    predictor = TaskPredictor.from_system(system, args.task)
    path = predictor.path
    if args.npy:
        inputs, names = np.load(args.npy, allow_pickle=False), None
    else:
        inputs, names = predictor.prepare_files(args.files), args.files
    labels, probs = predictor.predict(args.task, inputs)
    class_names = predictor.class_names
    rows = []
    for i, (lab, pr) in enumerate(zip(labels, probs)):
        name = class_names[lab] if lab < len(class_names) else str(lab)
        rows.append([names[i] if names else str(i), str(int(lab)), name, f"{pr[lab]:.4f}"])
    if args.json:
        print(
            json.dumps(
                [
                    {"input": r[0], "label": int(r[1]), "class": r[2], "probability": float(r[3])}
                    for r in rows
                ]
            )
        )
    else:
        print(table(["input", "label", "class", "probability"], rows))
    print(
        f"read {store.files_read - files0} component file(s), "
        f"{store.bytes_read - bytes0:,} bytes "
        f"(path of {len(path.components)} components; {bytes0:,} bytes of store metadata)",
        file=sys.stderr,
    )


def cmd_serve(args: argparse.Namespace) -> None:
    """Serves every task of the store over HTTP (Ray Serve) until interrupted."""
    from mu2net.serve.app import ServeConfig, start, stop

    config = ServeConfig(
        store=args.store,
        host=args.host,
        port=args.port,
        replicas=args.replicas,
        max_paths=args.max_paths,
        max_bytes=int(args.max_mb * 2**20) if args.max_mb else None,
        max_batch_size=args.max_batch_size,
        batch_wait_s=args.batch_wait_ms / 1000.0,
        refresh_s=args.refresh_s,
        modules=tuple(args.module),
    )
    url = start(config, ray_address=args.ray_address)
    print(f"serving {args.store} at {url} (POST {url}/v1/tasks/TASK:predict); Ctrl-C stops")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stop()


def cmd_report(args: argparse.Namespace) -> None:
    """Writes the HTML report."""
    from mu2net.evolution.report import write_report
    from mu2net.system.store import Store

    out = write_report(Store.open(args.store), args.out)
    print(f"report written to {out}")


def cmd_train(args: argparse.Namespace, rest: Sequence[str]) -> int:
    """Delegates to the train binary."""
    from mu2net.train import main as train_main

    return int(train_main.main(list(rest)) or 0)


def cmd_cache_tasks(args: argparse.Namespace) -> None:
    """Caches tasks with Beam."""
    from mu2net.tasks import cache

    _import_modules(args.module)
    cache.cache_tasks([t for t in args.tasks.split(",") if t], args.output_cache_dir)
    print(f"cached {args.tasks} into {args.output_cache_dir}")


def cmd_demo(args: argparse.Namespace) -> None:
    """Runs the embedded default."""
    from mu2net.evolution.demo import run_demo

    run_demo(args.store, fresh=args.fresh, progress=not args.no_progress)


def cmd_launch(args: argparse.Namespace) -> None:
    """Runs agents as Ray tasks (local Ray, or the cluster at --ray_address)."""
    from mu2net.evolution import launch

    options = launch.LaunchOptions(
        store=args.store,
        gin_files=tuple(args.gin_file),
        gin_bindings=tuple(args.gin_bindings),
        gin_search_paths=tuple(p for p in args.gin_search_paths.split(",") if p),
        modules=tuple(args.module),
        cycles=args.cycles,
        continuous=args.continuous,
        max_retries=args.max_retries,
        lease_ttl_s=args.lease_ttl_s,
        poll_seconds=args.poll_seconds,
        run_dir=args.run_dir,
        logdir=args.logdir,
        check_resources=not args.no_resource_check,
    )
    specs = launch.read_spec(args.agents) if args.agents else ()
    runs = launch.launch(
        options, specs, ray_address=args.ray_address, dashboard=not args.no_dashboard
    )
    print(f"{len(runs)} agent(s) finished")


# ------------------------------------------------------------------------------ helpers
_DOING = {
    "init": "creating a system at {store}",
    "add-task": "validating and adding {tasks} to the system at {store}",
    "evolve": "evolving the system at {store}",
    "status": "reading the system at {store}",
    "eval": "evaluating published paths of the system at {store} on the {split} split",
    "predict": "predicting {task} with the system at {store}",
    "report": "writing the report of the system at {store} to {out}",
    "cache-tasks": "caching {tasks} into {output_cache_dir} with Beam",
    "demo": "running the demo in {store}",
}


def _doing(args: argparse.Namespace) -> str:
    """The one line a verb starts with: what it is about to do."""
    fields = {k: (", ".join(v) if isinstance(v, list) else v) for k, v in vars(args).items()}
    if fields.get("tasks") in (None, ""):
        fields["tasks"] = "all tasks"
    template = _DOING.get(args.verb, "{verb}")
    try:
        return template.format(**fields)
    except (KeyError, IndexError):
        return args.verb


def _fmt(x) -> str:
    return "-" if x is None else f"{float(x):.4f}"


def _import_modules(modules: Sequence[str]) -> None:
    import importlib

    import mu2net.tasks  # noqa: F401  (registers the bundled tasks)

    for m in modules or []:
        importlib.import_module(m)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every verb."""
    from mu2net.gin_utils import add_gin_flags

    parser = argparse.ArgumentParser(prog="mu2net", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show every library log line (TensorFlow, absl, XLA); also MU2NET_VERBOSE=1",
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name, help_, store=True, module=False):
        p = sub.add_parser(name, help=help_, description=help_)
        if store:
            p.add_argument("--store", required=True, help="system store (directory or URL)")
        if module:
            p.add_argument(
                "--module",
                action="append",
                default=[],
                help="Python module to import first (registers your seqio tasks)",
            )
        return p

    p = verb("init", "create a new system from a root family/checkpoint")
    p.add_argument("--name", default=None, help="system name (default: the store's folder)")
    add_gin_flags(p)
    p = verb("add-task", "add seqio task(s) to the live mixture", module=True)
    p.add_argument("tasks", nargs="+", help="registered seqio task or mixture names")
    p = verb("evolve", "run evolution (cycles over the live mixture, or continuous)", module=True)
    from mu2net.evolution.agents import add_lease_flags
    from mu2net.evolution.main import build_parser as evolve_parser

    for action in evolve_parser()._actions:
        if action.dest in ("help", "store"):
            continue
        p._add_action(action)
    add_lease_flags(p)
    verb("status", "tasks, best paths, quality, params/task, sharing, last commit and verify")
    p = verb("verify", "check every file the latest state references (checksums, indexes)")
    p.add_argument(
        "--repair", action="store_true", help="rewrite task indexes (never params/manifests)"
    )
    p = verb("eval", "evaluate published paths on a split", module=True)
    p.add_argument("--tasks", nargs="*", default=None, help="tasks (default: all)")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p = verb("predict", "labels and probabilities for image/text files or a .npy batch")
    p.add_argument("--task", required=True)
    p.add_argument(
        "files", nargs="*", help="image files (png/jpg) or text files (one example per line)"
    )
    p.add_argument("--npy", default=None, help="a preprocessed batch saved with numpy.save")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p = verb("serve", "serve every task over HTTP JSON (Ray Serve; local Ray)", module=True)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: local only)")
    p.add_argument("--replicas", type=int, default=1, help="TaskServer replicas")
    p.add_argument("--ray_address", default=None, help="Ray cluster (default: a local Ray)")
    p.add_argument("--max_paths", type=int, default=64, help="paths held per replica (LRU)")
    p.add_argument("--max_mb", type=float, default=0, help="component MiB per replica (0: none)")
    p.add_argument("--max_batch_size", type=int, default=16, help="requests batched per task")
    p.add_argument("--batch_wait_ms", type=float, default=2.0, help="batch wait per task")
    p.add_argument("--refresh_s", type=float, default=2.0, help="new-path check period")
    p = verb("report", "write an HTML report with plots")
    p.add_argument("--out", required=True, help="output directory")
    verb("train", "train one path (t5x-style gin binary; flags as mu2net.train.main)", store=False)
    p = verb(
        "cache-tasks",
        "cache preprocessed tasks with Beam (DirectRunner here)",
        store=False,
        module=True,
    )
    p.add_argument("--tasks", required=True, help="comma-separated task names")
    p.add_argument("--output_cache_dir", required=True)
    p = verb(
        "demo",
        "the embedded default: evolve the bundled image tasks and print results",
        store=False,
    )
    p.add_argument("--store", default="runs/demo", help="where to keep the demo system")
    p.add_argument("--fresh", action="store_true", help="start from an empty store")
    p.add_argument("--no_progress", action="store_true")
    p = verb("launch", "run agents as Ray tasks (local Ray or --ray_address)", module=True)
    add_gin_flags(p)
    p.add_argument("--ray_address", default=None, help="Ray cluster (default: a local Ray)")
    p.add_argument("--agents", default=None, help="SPEC file (YAML/JSON) of agents")
    p.add_argument("--cycles", type=int, default=0, help="task iterations per task (0: gin)")
    p.add_argument("--continuous", action="store_true", help="serve; new tasks get agents")
    p.add_argument("--max_retries", type=int, default=3, help="Ray retries of a dead worker")
    p.add_argument("--lease_ttl_s", type=float, default=30.0, help="shard lease TTL")
    p.add_argument("--poll_seconds", type=float, default=10.0, help="live-mixture poll period")
    p.add_argument("--run_dir", default=None, help="per-agent log files (default: in store)")
    p.add_argument("--logdir", default=None, help="TensorBoard root (default: store/tensorboard)")
    p.add_argument("--no_resource_check", action="store_true", help="autoscaling clusters")
    p.add_argument("--no_dashboard", action="store_true", help="local Ray without dashboard")
    return parser


VERBS = {
    "init": cmd_init,
    "add-task": cmd_add_task,
    "evolve": cmd_evolve,
    "status": cmd_status,
    "verify": cmd_verify,
    "eval": cmd_eval,
    "predict": cmd_predict,
    "serve": cmd_serve,
    "report": cmd_report,
    "cache-tasks": cmd_cache_tasks,
    "demo": cmd_demo,
    "launch": cmd_launch,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mu2net`` console script.

    Run as the console script (``argv`` None), the process is quiet: TensorFlow/absl/XLA/CUDA
    start-up noise is dropped (:mod:`mu2net.quiet`) unless ``--verbose`` is given (anywhere
    on the line) or ``MU2NET_VERBOSE=1`` is set.
    """
    from mu2net import quiet

    console = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = quiet.verbose_requested(argv)
    argv = [a for a in argv if a != "--verbose"]
    if console and not verbose:
        quiet.quiet_process()
    from mu2net.gin_utils import rewrite_gin_args

    parser = build_parser()
    if argv and argv[0] == "train":
        if len(argv) > 1 and argv[1] in ("-h", "--help"):
            parser.parse_args(["train", "--help"])
        return cmd_train(argparse.Namespace(), argv[1:])
    args = parser.parse_args(rewrite_gin_args(argv))
    print(f"mu2net {args.verb}: {_doing(args)}", file=sys.stderr, flush=True)
    try:
        VERBS[args.verb](args)
    except Mu2netError as e:  # anything else is a bug: let its traceback show
        print(f"mu2net {args.verb}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
