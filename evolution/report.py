"""The HTML report of a stored system: ``mu2net report --store DIR --out OUT``.

Everything comes from the store (manifests and the candidate history), so the report needs
neither TensorFlow nor seqio. It writes ``OUT/index.html`` plus three PNG figures next to it,
referenced by relative links (copy the folder as a whole):

* ``system_graph.png``: rows = root and tasks, columns = component slots in path order; a cell
  holds the component id and is coloured by who uses it (root-frozen, shared by k tasks, own).
  A multipath (composite) row shows its own components (router, connectors) and an arrow to
  the row of each other task whose path it runs as a sub-path.
* ``quality_vs_params.png``: validation quality vs accounted params per task (reference §1.3);
  a hollow marker at the path's full size shows what sharing saves.
* ``history.png``: the score of every candidate of every task iteration, best-so-far line.

Figures are drawn with matplotlib's object API on the Agg canvas, so the caller's pyplot
backend and global state are left alone.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from mu2net.evolution.budget import compute_by_task
from mu2net.system.state import ROOT_LOCK_PREFIX, Path, System
from mu2net.system.store import Store

GRAPH_PNG = "system_graph.png"
QUALITY_PNG = "quality_vs_params.png"
HISTORY_PNG = "history.png"

_ROOT_COLOUR = "#8fbf8f"
_OWN_COLOUR = "#f2e6c9"


def write_report(store: Store, out_dir: str) -> str:
    """Writes the HTML report of ``store`` into ``out_dir`` (created if needed).

    Args:
      store: an opened system store.
      out_dir: local output directory; ``index.html`` and the PNG figures are written there.

    Returns:
      The path of the HTML file.
    """
    system = store.load()
    history = store.history()
    candidates = [r for r in history if r.get("event") is None and "path" in r]
    os.makedirs(out_dir, exist_ok=True)
    paths = system.task_paths()
    images = []
    if paths or system.roots():
        _plot_graph(system, os.path.join(out_dir, GRAPH_PNG))
        images.append(("System graph", GRAPH_PNG))
    if paths:
        _plot_quality(system, paths, os.path.join(out_dir, QUALITY_PNG))
        images.append(("Quality vs accounted params", QUALITY_PNG))
    by_task = _group_history(candidates)
    if by_task:
        _plot_history(by_task, os.path.join(out_dir, HISTORY_PNG))
        images.append(("Evolution history", HISTORY_PNG))
    out = os.path.join(out_dir, "index.html")
    with open(out, "w", encoding="utf-8") as f:
        f.write(_html(store, system, paths, candidates, by_task, images, compute_by_task(history)))
    return out


# ----------------------------------------------------------------------------- data helpers
def _sharers(system: System, cid: str) -> tuple[int, bool]:
    """(number of tasks whose published path uses ``cid``, whether a root uses it)."""
    locks = system.components[cid].locks
    root = any(lk.startswith(ROOT_LOCK_PREFIX) for lk in locks)
    return sum(1 for lk in locks if not lk.startswith(ROOT_LOCK_PREFIX)), root


def subpath_edges(system: System) -> list[dict[str, str]]:
    """One edge per sub-path of every published composite path: path, slot, task, sub-path."""
    return [
        {"path": p.id, "slot": sub.slot, "task": sub.task, "subpath": sub.path}
        for p in system.task_paths()
        for sub in p.subpaths
    ]


def _cells(path: Path) -> dict[str, str]:
    """The components drawn in a path's row: a composite path's own (not its sub-paths')."""
    return {n: cid for n, cid in path.components.items() if not (path.is_composite and "/" in n)}


def _names_in_order(path: Path) -> list[str]:
    """The path's component names, input side first (the family's order, when it is known)."""
    from mu2net.models.base import FamilyError, get_family

    try:
        canonical = get_family(path.family).component_names(path.hparams)
    except (FamilyError, KeyError, ValueError):  # an unregistered family: keep stored order
        canonical = []
    rank = {n: i for i, n in enumerate(canonical)}
    return sorted(_cells(path), key=lambda n: rank.get(n, len(rank)))


def _slot_order(paths: Iterable[Path]) -> list[str]:
    """Union of the paths' component names, each inserted after its predecessor in a path."""
    order: list[str] = []
    for p in paths:
        prev = None
        for name in _names_in_order(p):
            if name not in order:
                order.insert(order.index(prev) + 1 if prev is not None else 0, name)
            prev = name
    return order


def _group_history(candidates: Sequence[Mapping[str, Any]]) -> dict[str, list[dict]]:
    by_task: dict[str, list[dict]] = {}
    for r in candidates:
        by_task.setdefault(r["task"], []).append(dict(r))
    for recs in by_task.values():
        recs.sort(key=lambda r: (r.get("iteration", 0), r.get("generation", 0), r.get("time", 0)))
    return by_task


def _lineage(system: System, best: Path, records: Mapping[str, Mapping]) -> list[dict]:
    """Ancestors of ``best`` (itself first) from the history records, up to a root."""
    chain, pid, seen = [], best.id, set()
    while pid and pid not in seen:
        seen.add(pid)
        known = system.paths.get(pid)
        if known is not None and known.is_root:
            chain.append({"path": pid, "task": known.task, "root": True})
            break
        rec = records.get(pid)
        if rec is None:
            chain.append({"path": pid, "task": known.task if known else "?", "missing": True})
            break
        chain.append(dict(rec))
        pid = rec.get("parent")
    return chain


def _fmt_mutations(muts: Mapping[str, Any] | None) -> str:
    """``key: old → new`` for hparams, ``name=action`` for components."""
    parts = []
    # Hparam changes first, structural records (component actions, expansions) last.
    items = sorted((muts or {}).items(), key=lambda kv: (isinstance(kv[1], Mapping), kv[0]))
    for k, v in items:
        if isinstance(v, Mapping):
            if v:
                parts.append(f"{k}: " + ", ".join(f"{n}={a}" for n, a in v.items()))
        elif isinstance(v, list | tuple) and len(v) == 2 and k != "expansions":
            parts.append(f"{k}: {v[0]} → {v[1]}")
        elif v not in (None, [], ""):
            parts.append(f"{k}: {v}")
    return "; ".join(parts) or "(none)"


def _num(x: Any, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{float(x):.{digits}f}"


def _short(task: str, n: int = 18) -> str:
    return task if len(task) <= n else task[: n - 1] + "…"


# ----------------------------------------------------------------------------- figures
def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _plot_graph(system: System, out: str) -> None:
    from matplotlib import colormaps
    from matplotlib.colors import to_hex
    from matplotlib.patches import Patch

    rows = [*system.roots(), *system.task_paths()]
    slots = _slot_order(rows)
    ks = {_sharers(system, c)[0] for p in rows for c in _cells(p).values()}
    max_k = max([*ks, 2])
    blues = colormaps["Blues"]

    def colour(k: int, root: bool) -> str:
        if root:
            return _ROOT_COLOUR
        return _OWN_COLOUR if k <= 1 else to_hex(blues(0.35 + 0.55 * (k - 1) / (max_k - 1)))

    fig = _figure(max(6.0, 1.1 * len(slots) + 2.5), max(2.0, 0.6 * len(rows) + 1.6))
    ax = fig.add_subplot()
    for i, p in enumerate(rows):
        for j, slot in enumerate(slots):
            cid = _cells(p).get(slot)
            if cid is None:
                ax.add_patch(_rect(j, i, "white", hatch="//"))
                continue
            k, root = _sharers(system, cid)
            ax.add_patch(_rect(j, i, colour(k, root)))
            agent = system.components[cid].agent
            owner = "" if agent == p.agent else _short(agent.split("~")[-1], 12)
            owner = "root" if owner and agent.startswith("root~") else owner
            label = cid.split("/", 1)[1] + f"\n{owner}" + (f" ×{k}" if k > 1 else "")
            ax.text(j + 0.5, i + 0.5, label, ha="center", va="center", fontsize=7)
    row_of = {p.task: i for i, p in enumerate(rows) if not p.is_root}
    for edge in subpath_edges(system):
        i, j = row_of.get(system.paths[edge["path"]].task), row_of.get(edge["task"])
        if i is not None and j is not None and i != j:
            ax.annotate(
                "", xy=(0, j + 0.5), xytext=(0, i + 0.5),
                arrowprops={"arrowstyle": "->", "connectionstyle": "arc3,rad=0.4", "lw": 1},
            )  # fmt: skip
    ax.set_xlim(-0.6 if subpath_edges(system) else 0, len(slots))
    ax.set_ylim(len(rows), 0)
    ax.set_xticks([j + 0.5 for j in range(len(slots))], slots, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(
        [i + 0.5 for i in range(len(rows))], [_short(p.task, 24) for p in rows], fontsize=8
    )
    ax.tick_params(length=0)
    handles = [
        Patch(color=_ROOT_COLOUR, label="root (frozen)"),
        Patch(color=_OWN_COLOUR, label="task-own"),
    ]
    handles += [
        Patch(color=colour(k, False), label=f"shared by {k} tasks") for k in sorted(ks) if k > 1
    ]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    ax.set_title(
        "Components per path (cell: id, owner when not the row's own, ×k: used by k tasks)",
        fontsize=10,
    )
    fig.savefig(out)


def _rect(x: float, y: float, colour: str, hatch: str | None = None):
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), 1, 1, facecolor=colour, edgecolor="grey", hatch=hatch, lw=0.5)


def _plot_quality(system: System, paths: Sequence[Path], out: str) -> None:
    from matplotlib.ticker import FuncFormatter

    fig = _figure(7.0, 4.5)
    ax = fig.add_subplot()
    for p in paths:
        q = p.metrics.get("quality")
        if q is None:
            continue
        acc, full = system.accounted_params(p), system.path_params(p)
        ax.plot([acc, full], [q, q], color="lightgrey", zorder=1)
        ax.scatter([full], [q], facecolors="none", edgecolors="grey", zorder=2)
        ax.scatter([acc], [q], zorder=3)
        ax.annotate(
            _short(p.task, 24), (acc, q), xytext=(4, 4), textcoords="offset points", fontsize=8
        )
    xs = [v for p in paths for v in (system.accounted_params(p), system.path_params(p))]
    if max(xs) > 10 * min(xs) > 0:
        ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.set_xlabel("params (filled: accounted, shared 1/k; hollow: whole path)")
    ax.set_ylabel("validation quality")
    ax.grid(alpha=0.3)
    fig.savefig(out)


def _plot_history(by_task: Mapping[str, list[dict]], out: str) -> None:
    from matplotlib.ticker import MaxNLocator

    n = len(by_task)
    cols = min(n, 3)
    nrows = -(-n // cols)
    fig = _figure(4.2 * cols, 3.0 * nrows)
    for i, (task, recs) in enumerate(by_task.items()):
        ax = fig.add_subplot(nrows, cols, i + 1)
        xs = list(range(len(recs)))
        scores = [r.get("score") for r in recs]
        good, bad = [], []
        for x, s, r in zip(xs, scores, recs):
            if s is not None:
                (good if r.get("improved") else bad).append((x, s))
        if good:
            ax.scatter(*zip(*good), s=14, label="improved (kept)")
        if bad:
            ax.scatter(*zip(*bad), s=14, facecolors="none", edgecolors="grey", label="discarded")
        best, line = -math.inf, []
        for s, r in zip(scores, recs):
            if s is not None and r.get("improved"):
                best = max(best, s)
            line.append(best if math.isfinite(best) else math.nan)
        ax.step(xs, line, where="post", color="C3", label="best so far")
        for x in range(1, len(recs)):
            if recs[x].get("iteration") != recs[x - 1].get("iteration"):
                ax.axvline(x - 0.5, color="k", ls=":", lw=0.8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(_short(task, 32), fontsize=9)
        ax.set_xlabel("candidate (dotted: new task iteration)", fontsize=8)
        ax.set_ylabel("score", fontsize=8)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7)
    fig.savefig(out)


# ----------------------------------------------------------------------------- HTML
_CSS = (
    "body{font-family:sans-serif;margin:2em;max-width:1200px}"
    "table{border-collapse:collapse;margin:.5em 0 1.5em}"
    "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left}"
    "th{background:#eee}td.n{text-align:right}img{max-width:100%}.diff{font-weight:bold}"
)


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[int] = ()):
    out = ["<table><tr>", *(f"<th>{html.escape(h)}</th>" for h in header), "</tr>"]
    for row in rows:
        cells = []
        for j, v in enumerate(row):
            raw = isinstance(v, _Raw)
            text = str(v) if raw else html.escape(str(v))
            cells.append(f"<td class='n'>{text}</td>" if j in numeric else f"<td>{text}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "".join(out)


class _Raw(str):
    """Already-escaped HTML for a table cell."""


def _html(store, system, paths, candidates, by_task, images, compute) -> str:
    e = html.escape
    name = store.system_name
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>mu2net: {e(name)}</title>",
        f"<style>{_CSS}</style></head><body><h1>mu2net system {e(name)}</h1>",
        f"<p>{len(system.tasks)} task(s), {len(system.roots())} root(s), "
        f"{len(system.components)} components, {system.total_params():,} params in use, "
        f"{len(candidates)} candidates in the history. Store: <code>{e(store.url)}</code></p>",
        "<h2>Summary</h2>",
    ]
    rows = []
    for p in paths:
        m, comps = p.metrics, p.components
        shared = sum(1 for cid in comps.values() if sum(_sharers(system, cid)) > 1)
        acc, full = f"{system.accounted_params(p):,.0f}", f"{system.path_params(p):,}"
        its, cands = m.get("task_iterations", 0), len(by_task.get(p.task, []))
        val, test = _num(m.get("quality")), _num(m.get("test_quality"))
        spent = compute.get(p.task, {})
        flops, secs = spent.get("flops", 0.0), spent.get("seconds", 0.0)
        rows.append(
            [p.task, p.id, val, test, acc, full, f"{shared}/{len(comps)}", its, cands,
             f"{flops / 1e12:,.2f}", f"{secs:,.0f}"]
        )  # fmt: skip
    header = "task|path|val|test|accounted params|path params|shared|iterations|candidates"
    header = (header + "|train+val TFLOPs|seconds").split("|")
    parts.append(_table(header, rows, numeric=(2, 3, 4, 5, 7, 8, 9, 10)))
    waiting = [t for t in system.tasks if system.best_path(t) is None]
    if waiting:
        parts.append(f"<p>Waiting for a first task iteration: {e(', '.join(waiting))}</p>")
    for title, file in images:
        parts.append(f"<h2>{e(title)}</h2><img src='{e(file)}' alt='{e(title)}'>")
    parts.append(_shared_table(system))
    edges = subpath_edges(system)
    if edges:
        rows = [[e_["path"], e_["slot"], e_["task"], e_["subpath"]] for e_ in edges]
        parts.append("<h2>Multipath sub-paths</h2>")
        parts.append(_table(["multipath path", "slot", "task", "sub-path (frozen)"], rows))
    records = {r["path"]: r for r in candidates}
    roots = {r.family: r for r in system.roots()}
    for p in paths:
        parts.append(_task_section(system, p, records, roots.get(p.family)))
    parts.append("</body></html>")
    return "\n".join(parts)


def _shared_table(system: System) -> str:
    used: dict[str, list[str]] = {}
    for p in [*system.roots(), *system.task_paths()]:
        for cid in p.components.values():
            used.setdefault(cid, []).append(p.task)
    comps = system.components
    rows = [
        [cid, comps[cid].name, f"{comps[cid].num_params:,}", ", ".join(users)]
        for cid, users in used.items()
        if len(users) > 1
    ]
    if not rows:
        return "<h2>Shared components</h2><p>No component is shared.</p>"
    header = ["component", "slot", "params", "used by"]
    return "<h2>Shared components</h2>" + _table(header, rows, numeric=(2,))


def _task_section(system: System, p: Path, records: Mapping, root: Path | None) -> str:
    e = html.escape
    out = [f"<h2>Task {e(p.task)}</h2>", f"<h3>Hyperparameters of the best path {e(p.id)}</h3>"]
    root_hp = root.hparams if root is not None else {}
    rows = []
    for k, v in sorted(p.hparams.items()):
        changed = k in root_hp and root_hp[k] != v
        text = "''" if v == "" else str(v)
        cell = _Raw(f"<span class='diff'>{e(text)}</span>") if changed else text
        root_v = root_hp.get(k, "-")
        rows.append([k, cell, "''" if root_v == "" else root_v])
    out.append(_table(["hparam", "value (bold: differs from root)", "root"], rows))
    out.append("<h3>Lineage (best path first, up to the root)</h3>")
    rows = []
    for a in _lineage(system, p, records):
        if a.get("root"):
            rows.append([a["path"], a["task"], "root", "-", "-", "-"])
        elif a.get("missing"):
            rows.append([a["path"], a["task"], "(no history record)", "-", "-", "-"])
        else:
            when = f"it {a.get('iteration', '?')} / gen {a.get('generation', '?')}"
            q, sc = _num(a.get("quality")), _num(a.get("score"))
            # ds_* changes are drawn per generation (reference §4.4), relative to its best path.
            muts = _fmt_mutations({**(a.get("ds_mutations") or {}), **(a.get("mutations") or {})})
            rows.append([a["path"], a.get("task", "?"), when, q, sc, muts])
    header = ["path", "task", "iteration", "quality", "score", "mutations"]
    out.append(_table(header, rows, numeric=(3, 4)))
    return "\n".join(out)
