"""`keel report RUN_DIR`: one self-contained HTML page with the run's curves and its logbook.

Loss, gradient norm and learning rate over the whole run, every restart segment included
(segment starts drawn as dotted lines), each intervention marked on the curves, and the
logbook chronicle beneath: the picture the OPT-175B team drew by hand. A diffusion run's
sample grids (RUN_DIR/samples/step_*.png, one per evaluation) show what it learnt over training.
"""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

from keel.errors import UserError  # noqa: E402
from keel.runs.registry import Registry  # noqa: E402
from keel.runs.rundir import LOGBOOK_FILE, load_run_config  # noqa: E402
from keel.supervisor.logbook import read_logbook, render_chronicle  # noqa: E402

PANELS = [
    ("loss", "training loss", "val_loss"),
    ("grad_norm", "gradient norm (before clipping)", None),
    ("lr", "learning rate", None),
]
MARKERS = {
    "skip_update": ("x", "tab:orange"),
    "rollback": ("<", "tab:red"),
    "scale_lr": ("v", "tab:purple"),
    "set_clip": ("d", "tab:brown"),
    "reset_optimizer": ("o", "tab:pink"),
    "stop": ("s", "black"),
    "restart": ("^", "tab:green"),
}


def write_report(run_dir: Path, registry: Registry | None = None) -> Path:
    """Write RUN_DIR/report/index.html (+ one PNG per panel) and return the HTML path."""
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    registry = registry or Registry()
    series = registry.metrics(config.name)
    if not series.get("loss"):
        raise UserError(
            f"the registry has no per-step metrics for run {config.name} ({run_dir}); train it first with keel train, "
            f"or if it trained while the registry was unusable, load what it kept with keel runs --import {run_dir}."
        )
    entries = read_logbook(run_dir / LOGBOOK_FILE) if (run_dir / LOGBOOK_FILE).exists() else []
    segment_starts = [first for _, first, _ in registry.segments(config.name)[1:]]

    out_dir = run_dir / "report"
    out_dir.mkdir(exist_ok=True)
    images = []
    for key, title, extra in PANELS:
        path = out_dir / f"{key}.png"
        _plot_panel(
            path,
            title,
            series.get(key, []),
            series.get(extra, []) if extra else [],
            entries,
            segment_starts,
            log_scale=key == "grad_norm",
        )
        images.append((title, path))

    interventions = [e for e in entries if e.get("kind") in ("action", "restart", "fault")]
    page = [
        "<!doctype html><meta charset='utf-8'>",
        f"<title>keel report: {html.escape(config.name)}</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "img{width:100%}pre{background:#f6f6f6;padding:1em;overflow-x:auto;font-size:13px}</style>",
        f"<h1>{html.escape(config.name)}</h1>",
        f"<p>{html.escape(str(run_dir))} — {len(series['loss'])} logged steps, "
        f"{len(segment_starts) + 1} process segment(s), {len(interventions)} intervention(s) and fault(s).</p>",
    ]
    for title, path in images:
        encoded = base64.b64encode(path.read_bytes()).decode()
        page.append(
            f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' src='data:image/png;base64,{encoded}'>"
        )
    page += _sample_grids(run_dir)
    page.append("<h2>Logbook</h2><pre>" + html.escape(render_chronicle(entries)) + "</pre>")
    target = out_dir / "index.html"
    tmp = out_dir / ".index.html.tmp"
    tmp.write_text("\n".join(page))
    os.replace(tmp, target)
    return target


MAX_GRIDS = 12  # sample grids embedded in a report, evenly spaced over the run, the last one always


def _sample_grids(run_dir: Path) -> list[str]:
    """HTML of the evaluation's sample grids over training, oldest first (none for a run without them)."""
    grids = sorted((run_dir / "samples").glob("step_*.png"))
    if not grids:
        return []
    if len(grids) > MAX_GRIDS:
        picks = {round(i * (len(grids) - 1) / (MAX_GRIDS - 1)) for i in range(MAX_GRIDS)}
        grids = [grids[i] for i in sorted(picks)]
    parts = ["<h2>Samples over training</h2><p>EMA weights, the same starting noise at every step.</p><div>"]
    for path in grids:
        step = int(path.stem.removeprefix("step_"))
        encoded = base64.b64encode(path.read_bytes()).decode()
        parts.append(
            "<figure style='display:inline-block;margin:0 8px 8px 0'>"
            f"<img style='width:auto;max-width:260px' alt='samples at step {step}' "
            f"src='data:image/png;base64,{encoded}'>"
            f"<figcaption>step {step:,}</figcaption></figure>"
        )
    return [*parts, "</div>"]


def _plot_panel(path: Path, title: str, points, extra_points, entries, segment_starts, log_scale: bool) -> None:
    fig, ax = plt.subplots(figsize=(11, 3.2), dpi=100)
    if points:
        steps, values = zip(*points)
        ax.plot(steps, values, lw=0.8, color="tab:blue", label=title)
    if extra_points:
        steps, values = zip(*extra_points)
        ax.plot(steps, values, "o-", ms=3, lw=1, color="tab:green", label="validation loss")
    for start in segment_starts:
        ax.axvline(start, ls=":", color="gray", lw=1)
    value_at = dict(points)
    seen = set()
    for entry in entries:
        kind = entry.get("name") if entry.get("kind") == "action" else entry.get("kind")
        if kind not in MARKERS or entry.get("step") is None:
            continue
        marker, color = MARKERS[kind]
        step = entry["step"]
        y = value_at.get(step, value_at.get(min(value_at, key=lambda s: abs(s - step)))) if value_at else 0
        ax.plot([step], [y], marker, color=color, ms=8, label=kind if kind not in seen else None)
        seen.add(kind)
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(title, loc="left", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
