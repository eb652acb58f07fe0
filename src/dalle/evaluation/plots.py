"""PNG plots of the evaluation curves and of training logs (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import csv
import dataclasses
import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

from dalle.errors import UserError


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError("plots need matplotlib (pip install 'dalle[eval]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_curves(path: str | Path, series: Mapping[str, Sequence[tuple[float, float]]], xlabel: str, ylabel: str,
                title: str = "", log_x: bool = False) -> Path:
    """One line per named series of ``(x, y)`` points, e.g. FD against blur radius for several models, or against
    the reranking sample size (``log_x=True``, as the sizes double). Returns the written path."""
    if not series or not any(series.values()):
        raise UserError("nothing to plot: every series is empty")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for name, points in series.items():
        xs, ys = zip(*points) if points else ((), ())
        ax.plot(xs, ys, marker="o", markersize=3, label=name)
    if log_x:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, plt, path)


@dataclasses.dataclass
class Panel:
    """One small plot of :func:`plot_panels`: its title (the metric's full name), named series of ``(x, y)``
    points, and optionally fixed y limits (e.g. ``(0, 1)`` for an accuracy)."""

    title: str
    series: Mapping[str, Sequence[tuple[float, float]]]
    ylim: tuple[float, float] | None = None


def plot_panels(path: str | Path, panels: Sequence[Panel], xlabel: str, log_x: bool = False) -> Path:
    """Several metrics against one x-axis, side by side (e.g. Fréchet distance and Inception-style score against blur
    radius). Empty panels are left out; with ``log_x`` the ticks are the x values themselves (1, 2, 4, …)."""
    panels = [p for p in panels if any(p.series.values())]
    if not panels:
        raise UserError("nothing to plot: every panel is empty")
    plt = _pyplot()
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4), dpi=120, squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for name, points in panel.series.items():
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=name)
        if log_x:
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted({x for points in panel.series.values() for x, _ in points}))
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
        if panel.ylim is not None:
            ax.set_ylim(*panel.ylim)
        ax.set_title(textwrap.fill(panel.title, 40), fontsize=9)
        ax.set_xlabel(xlabel, fontsize=9)
        ax.grid(alpha=0.3)
        if len(panel.series) > 1:
            ax.legend(fontsize="small")
    return _save(fig, plt, path)


def read_log(path: str | Path) -> tuple[list[float], dict[str, list[float]]]:
    """A CSV log with a ``step`` column and one column per metric → steps and per-metric values (NaN where blank:
    a validation metric logged only every few steps)."""
    path = Path(path)
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as err:
        raise UserError(f"cannot read log {path}: {err}") from None
    if not rows or "step" not in rows[0]:
        raise UserError(f"{path}: expected a CSV with a header holding a 'step' column")
    steps = [float(r["step"]) for r in rows]
    names = [k for k in rows[0] if k != "step"]

    def value(text: str | None) -> float:
        try:
            return float(text) if text not in (None, "") else math.nan
        except ValueError:
            return math.nan
    return steps, {name: [value(r.get(name)) for r in rows] for name in names}


def plot_log(path: str | Path, log_csv: str | Path, metrics: Sequence[str] | None = None,
             log_y: bool = False) -> Path:
    """Training curves from a CSV log: one panel per metric (all columns but ``step`` unless ``metrics`` names
    them); blank cells are skipped, so sparse validation columns draw as lines through their points."""
    steps, columns = read_log(log_csv)
    names = list(metrics) if metrics else list(columns)
    unknown = [n for n in names if n not in columns]
    if unknown:
        raise UserError(f"{log_csv} has no column {unknown[0]!r} (columns: {', '.join(columns)})")
    if not names:
        raise UserError(f"{log_csv} has no metric columns besides 'step'")
    plt = _pyplot()
    fig, axes = plt.subplots(len(names), 1, figsize=(5, 2.2 * len(names)), dpi=120, sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        points = [(s, v) for s, v in zip(steps, columns[name]) if not math.isnan(v)]
        if points:  # markers while the points are few (a sparse validation log, a short run), else a plain line
            ax.plot(*zip(*points), linewidth=1, marker="o" if len(points) < 30 else None, markersize=3)
        ax.set_ylabel(name)
        if log_y and all(v > 0 for _, v in points):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    return _save(fig, plt, path)


def _save(fig, plt, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
