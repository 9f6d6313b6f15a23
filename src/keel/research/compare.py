"""`keel compare RUN...`: runs side by side, on one self-contained HTML page and in a terminal table.

For each run: its training and validation loss curves, overlaid on the others' against optimizer steps,
training tokens and training time (the sum of its steps' times, so restarts and evaluations do not
stretch it); its final numbers (status, steps, tokens, time, last and best val loss); the supervisor's
interventions, counted by action from its logbook. And, across the runs, the config keys whose resolved
values differ: what the comparison is about.

A RUN is a run directory, or the name of a run the registry knows. The curves come from the registry; a
run that trained while the registry was unusable (or under another KEEL_HOME) has none there until
`keel runs --import RUN_DIR` loads them from its directory.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.ticker import FuncFormatter

from keel.config import RunConfig
from keel.errors import UserError
from keel.runs.registry import Registry
from keel.runs.rundir import LOGBOOK_FILE, load_run_config
from keel.supervisor.logbook import read_logbook, summarize

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

SMOOTHING_SPAN = 10  # steps in the moving average drawn over each raw training-loss curve


@dataclass
class RunView:
    """What compare reads of one run."""

    name: str
    run_dir: Path
    config: RunConfig
    row: dict[str, Any]  # the registry's row
    series: dict[str, list[tuple[int, float]]]  # the registry's metrics, {key: [(step, value), ...]}
    entries: list[dict]  # the logbook


@dataclass
class Comparison:
    runs: list[RunView]
    differences: list[tuple[str, list[Any]]]
    table: str
    page: Path


def compare_runs(runs: list[str], out: Path, registry: Registry | None = None) -> Comparison:
    """Read the runs, write the page to out, return the terminal table with it."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; pass the HTML file to write, e.g. {out}/compare.html.")
    if len(runs) < 2:
        raise UserError(f"keel compare needs two runs or more, got {len(runs)}; name the runs to set beside it.")
    registry = registry or Registry()
    views = [_read(run, registry) for run in runs]
    for seen, view in enumerate(views):
        twin = next((v for v in views[:seen] if v.name == view.name), None)
        if twin is not None:
            same = twin.run_dir.resolve() == view.run_dir.resolve()
            raise UserError(
                f"{view.run_dir} is given twice; name each run once."
                if same
                else f"{twin.run_dir} and {view.run_dir} are both named {view.name}, and the registry keeps one "
                "run per name; compare runs with different names."
            )
    differences = config_differences([v.config for v in views])
    table = format_tables(views, differences)
    page = _write_page(views, differences, out)
    return Comparison(views, differences, table, page)


def _read(run: str, registry: Registry) -> RunView:
    run_dir = Path(run)
    if not run_dir.exists():  # perhaps the name of a run the registry knows
        row = registry.get_run(run)
        if row is not None:
            run_dir = Path(row["run_dir"])
    config = load_run_config(run_dir)  # a clear sentence for a path that is not a run
    row = registry.get_run(config.name)
    series = registry.metrics(config.name) if row is not None else {}
    if not series.get("loss"):
        raise UserError(
            f"the registry has no metrics for run {config.name} ({run_dir}); if it trained while the registry was "
            f"unusable or under another KEEL_HOME, load them from its directory with `keel runs --import {run_dir}`."
        )
    return RunView(config.name, run_dir, config, row, series, read_logbook(run_dir / LOGBOOK_FILE))


def config_differences(configs: list[RunConfig]) -> list[tuple[str, list[Any]]]:
    """(key, [value per run]) for every config key whose resolved values differ, in the config's order.
    The run's name is left out: it always differs and heads every column anyway."""
    flat = [c.to_flat_dict() for c in configs]
    return [
        (key, [f.get(key) for f in flat])
        for key in flat[0]
        if key != "name" and any(f.get(key) != flat[0][key] for f in flat[1:])
    ]


def _cumulative(points: list[tuple[int, float]]) -> dict[int, float]:
    total, out = 0.0, {}
    for step, value in points:
        total += 0.0 if math.isnan(value) else value
        out[step] = total
    return out


def _axis_at(axis: dict[int, float], step: int) -> float | None:
    """Where the evaluation after step updates sits on a tokens or time axis: at the row of the update
    that made it, logged as row step - 1 (the last row before it, when that step was skipped)."""
    earlier = [s for s in axis if s < step]
    return axis[max(earlier)] if earlier else None


def final_numbers(view: RunView) -> dict[str, Any]:
    val = [v for _, v in view.series.get("val_loss", [])]
    return {
        "status": view.row["status"],
        "steps": view.row["step"],
        "tokens": view.row["tokens"],
        "seconds": sum(v for _, v in view.series.get("step_seconds", []) if not math.isnan(v)),
        "val_loss": val[-1] if val else None,
        "best_val_loss": view.row["best_val_loss"],
        "interventions": summarize(view.entries)["interventions"],
    }


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _interventions(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {name}" for name, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))) or "none"


def _align(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
        for r in rows
    ]


def _value_text(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _metric_rows(views: list[RunView]) -> list[list[str]]:
    header = ["run", "status", "steps", "tokens", "train time", "final val loss", "best val loss", "interventions"]
    rows = [header]
    for view in views:
        n = final_numbers(view)
        rows.append(
            [
                view.name,
                n["status"],
                str(n["steps"]),
                _count(n["tokens"]),
                f"{n['seconds']:.1f} s",
                _loss(n["val_loss"]),
                _loss(n["best_val_loss"]),
                _interventions(n["interventions"]),
            ]
        )
    return rows


def format_tables(views: list[RunView], differences: list[tuple[str, list[Any]]]) -> str:
    """The terminal's view: final numbers per run, then the config keys that differ."""
    lines = _align(_metric_rows(views), right={2, 3, 4, 5, 6})
    if differences:
        rows = [["config key", *(v.name for v in views)]]
        rows += [[key, *map(_value_text, values)] for key, values in differences]
        lines += ["", *_align(rows, right=set())]
    else:
        lines += ["", "config: the same resolved config (apart from the name)"]
    return "\n".join(lines)


def _smooth(values: list[float], span: int) -> list[float]:
    alpha, level, out = 2 / (span + 1), None, []
    for value in values:
        if not math.isnan(value):
            level = value if level is None else level + alpha * (value - level)
        out.append(level if level is not None else math.nan)
    return out


def _plot(views: list[RunView]) -> str:
    fig, axes = plt.subplots(2, 3, figsize=(14, 7), dpi=100, sharey="row")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    titles = ("optimizer steps", "training tokens", "training time (s, sum of step times)")
    for index, view in enumerate(views):
        color = colors[index % len(colors)]
        train = view.series.get("loss", [])
        x_axes = [
            {s: float(s) for s, _ in train},
            dict(view.series.get("tokens", [])),
            _cumulative(view.series.get("step_seconds", [])),
        ]
        for column, axis in enumerate(x_axes):
            points = [(axis[s], v) for s, v in train if s in axis]
            if points:
                xs, ys = zip(*points)
                axes[0][column].plot(xs, ys, lw=0.6, alpha=0.25, color=color)
                axes[0][column].plot(xs, _smooth(list(ys), SMOOTHING_SPAN), lw=1.4, color=color, label=view.name)
            val = [(float(s) if column == 0 else _axis_at(axis, s), v) for s, v in view.series.get("val_loss", [])]
            val = [(x, v) for x, v in val if x is not None]
            if val:
                xs, ys = zip(*val)
                axes[1][column].plot(xs, ys, "o-", ms=3, lw=1.2, color=color, label=view.name)
    for column, title in enumerate(titles):
        for row, what in enumerate(("training loss", "validation loss")):
            ax = axes[row][column]
            ax.set_xlabel(title)
            ax.grid(alpha=0.3)
            if column == 0:
                ax.set_ylabel(what)
        axes[0][column].legend(fontsize=8)
    for row in axes:
        row[1].xaxis.set_major_formatter(FuncFormatter(lambda x, _: _count(int(x))))
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def _html_table(rows: list[list[str]]) -> str:
    esc = html.escape
    head = "<tr>" + "".join(f"<th>{esc(c)}</th>" for c in rows[0]) + "</tr>"
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows[1:])
    return f"<table>{head}{body}</table>"


def _write_page(views: list[RunView], differences: list[tuple[str, list[Any]]], out: Path) -> Path:
    names = [v.name for v in views]
    actions = sorted({name for v in views for name in summarize(v.entries)["interventions"]})
    summaries = [summarize(v.entries) for v in views]
    intervention_rows = [["run", *actions, "faults", "restarts"]] + [
        [v.name, *(str(s["interventions"].get(a, 0)) for a in actions), str(s["faults"]), str(s["restarts"])]
        for v, s in zip(views, summaries)
    ]
    parts = [
        "<!doctype html><meta charset='utf-8'>",
        f"<title>keel compare: {html.escape(', '.join(names))}</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
        "img{width:100%}table{border-collapse:collapse;font-size:13px;margin-bottom:1em}"
        "td,th{border-bottom:1px solid #ddd;padding:3px 8px;text-align:left}</style>",
        f"<h1>{html.escape(' vs '.join(names))}</h1>",
        "<h2>Final numbers</h2>",
        _html_table(_metric_rows(views)),
        "<h2>Config differences</h2>",
        _html_table([["config key", *names], *([k, *map(_value_text, vals)] for k, vals in differences)])
        if differences
        else "<p>The same resolved config, apart from the name.</p>",
        "<h2>Loss curves</h2>",
        f"<p>Training loss faint as logged, with a {SMOOTHING_SPAN}-step moving average over it; validation loss at "
        "each evaluation.</p>",
        f"<img alt='loss curves' src='data:image/png;base64,{_plot(views)}'>",
        "<h2>Interventions</h2><p>Supervisor actions by kind, from each run's logbook (faults and restarts from "
        "its watchdog).</p>",
        _html_table(intervention_rows),
        "<p>Runs: " + ", ".join(f"{html.escape(v.name)} ({html.escape(str(v.run_dir))})" for v in views) + "</p>",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp"
    tmp.write_text("\n".join(parts))
    os.replace(tmp, out)
    return out
