"""The PNG plots: test accuracy vs epoch, and per-layer metrics vs step, one figure of each kind
per (dataset, model); mean over seeds, band ± std."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter, MaxNLocator

from fdfa.report.group import Row
from fdfa.report.load import Skip
from fdfa.report.values import slug

# Per-layer metrics plotted against the step: file prefix, record key ({} is the layer name),
# title, y label, log scale. The two errors measure different things and get their own figures.
LAYER_PLOTS = [
    ("align", "align/{}/cos", "alignment with BP", "cosine(update, BP gradient)", False),
    (
        "feedback",
        "feedback/{}/cos",
        "feedback B vs its target (J_l: direct rules; W_l: backward-path rules)",
        "cosine",
        False,
    ),
    (
        "grad_error",
        "estimator/{}/grad_rel_mse",
        "weight-update error vs the true gradient (every rule)",
        "|update - dL/dW|² / |dL/dW|²",
        True,
    ),
    (
        "jacobian_error",
        "estimator/{}/jacobian_rel_mse",
        "FDFA's Jacobian estimate Ĵ vs the true Jacobian J",
        "|Ĵ - J|² / |J|²",
        True,
    ),
]


def _mean_band(curves: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x, mean and sample std over the curves that have each x (std 0 where only one has it)."""
    xs = sorted(set().union(*curves))
    values = [[c[x] for c in curves if x in c] for x in xs]
    std = [np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in values]
    return np.array(xs), np.array([np.mean(v) for v in values]), np.array(std)


# One colour per rule, the same in every plot (BP black); rules not named here take the spare
# colours in the order of their names. Rows of one rule (its variants) differ in line and marker.
RULE_COLOURS = {
    "bp": "black",
    "dfa": "tab:blue",
    "dkp": "tab:orange",
    "fdfa": "tab:green",
    "fg_w": "tab:red",
    "fg_a": "tab:purple",
    "fa": "tab:brown",
    "kp": "tab:pink",
    "usf": "tab:olive",
    "brsf": "tab:cyan",
    "frsf": "darkgoldenrod",
    "drtp": "navy",
}
SPARE_COLOURS = ["tab:gray", "teal", "magenta", "lime", "maroon"]
LINE_STYLES = ["-", "--", ":", "-."]
MARKERS = ["o", "s", "^", "v", "D", "P", "X", "*"]


def row_styles(rows: list[Row]) -> list[dict]:
    """Line colour (the rule's), style and marker (the row's rank among its rule's rows) of each
    row; ``ax.plot`` keyword arguments."""
    names = [row.runs[0].names[2] for row in rows]
    others = sorted({n for n in names if n not in RULE_COLOURS})
    styles, seen = [], {}
    for name in names:
        i = seen[name] = seen.get(name, -1) + 1
        colour = RULE_COLOURS.get(name) or SPARE_COLOURS[others.index(name) % len(SPARE_COLOURS)]
        styles.append(
            {"color": colour, "linestyle": LINE_STYLES[i % 4], "marker": MARKERS[i % len(MARKERS)]}
        )
    return styles


def _plot_band(
    ax, curves, label, scale: float = 1.0, style=None, clip=(-np.inf, np.inf), band=True
) -> None:
    """The mean of curves, and a band ± their std clipped to ``clip`` (accuracy: 0 to 100 %)."""
    x, mean, std = _mean_band(curves)
    style = {"marker": "."} if style is None else style
    if len(x) >= 30:
        style = {**style, "marker": None}
    (line,) = ax.plot(x, mean * scale, label=label, markersize=4, **style)
    if band and len(curves) > 1:
        low, high = np.clip((mean - std) * scale, *clip), np.clip((mean + std) * scale, *clip)
        ax.fill_between(x, low, high, alpha=0.15, lw=0, color=line.get_color())


LEGEND_WRAP = 70  # characters per legend line; longer labels wrap
MAX_BANDS = 6  # an accuracy plot of more rows draws the means only
TITLE_CHARS_PER_INCH = 9  # titles wrap at this many characters per inch of their width


class PlainLogFormatter(LogFormatter):
    """Log-axis tick labels as plain numbers (100000, 0.985), with the digits the axis' span
    needs to tell neighbouring ticks apart; matplotlib chooses which ticks get one."""

    def _num_to_string(self, x, vmin, vmax):
        digits = max(1, math.ceil(math.log10(abs(x) / max(vmax - vmin, 1e-300))) + 2)
        return np.format_float_positional(x, precision=digits, fractional=False, trim="-")


def _plain_y(ax) -> None:
    """y tick labels without an offset ("1e-12+1"): a flat curve gets a small span around it;
    on a log scale plain numbers (0.985, not 9.85 x 10^-1)."""
    if ax.get_yscale() != "linear":
        ax.yaxis.set_major_formatter(PlainLogFormatter(labelOnlyBase=False))
        ax.yaxis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False))
        return
    lo, hi = ax.get_ylim()
    if hi - lo < 1e-6 * max(1.0, abs(hi)):
        pad = 0.05 * max(1.0, abs(hi))
        ax.set_ylim(lo - pad, hi + pad)
    ax.ticklabel_format(axis="y", useOffset=False)


def plot_accuracy(rows: list[Row], title: str, path: Path) -> Figure:
    """Test accuracy against epoch, one curve per row; the legend goes below the axes and the
    figure grows with it, so no number of rows or length of label squeezes the plot. A rule has
    one colour (row_styles); bands ± std only up to MAX_BANDS rows (more would cover each other)."""
    labels = [textwrap.fill(row.label, LEGEND_WRAP, subsequent_indent="  ") for row in rows]
    legend_lines = sum(label.count("\n") + 1 for label in labels)
    fig = Figure(figsize=(6.4, 4.2 + 0.19 * legend_lines + 0.2), layout="constrained")
    ax = fig.add_subplot()
    bands = len(rows) <= MAX_BANDS
    for row, label, style in zip(rows, labels, row_styles(rows)):
        curves = [r.curve("test/acc", "epoch") for r in row.runs]
        _plot_band(ax, curves, label, scale=100, style=style, clip=(0, 100), band=bands)
    what = (
        "mean ± std over seeds"
        if bands
        else f"mean over seeds (± std bands: {MAX_BANDS} rows at most)"
    )
    ax.set(xlabel="epoch", ylabel="test accuracy (%)", title=f"{title}: {what}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # no epoch 1.5
    _plain_y(ax)
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", fontsize="small", frameon=False)
    fig.savefig(path, dpi=110)
    return fig


def plot_layers(
    rows: list[Row], key_fmt: str, title: str, ylabel: str, path: Path, log=False
) -> Figure:
    """One panel per row, one line (mean over seeds, band ± std) per layer, against the step; a
    panel's title has its rule's colour (as in the accuracy plot)."""
    ncols = min(3, len(rows))
    nrows = math.ceil(len(rows) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.2 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, row, style in zip(axes, rows, row_styles(rows)):
        layers = list(dict.fromkeys(name for r in row.runs for name in r.layers(key_fmt)))
        for layer in layers:
            curves = [c for r in row.runs if (c := r.curve(key_fmt.format(layer), "step"))]
            if curves:
                _plot_band(ax, curves, layer)
        if log and all(v > 0 for line in ax.get_lines() for v in line.get_ydata()):
            ax.set_yscale("log")
        _plain_y(ax)
        ax.set_title(textwrap.fill(row.label, TITLE_CHARS_PER_INCH * 4), color=style["color"])
        ax.set(xlabel="step", ylabel=ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # no step 1.5
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(rows) :]:
        ax.set_visible(False)
    fig.suptitle(textwrap.fill(title, int(TITLE_CHARS_PER_INCH * fig.get_figwidth())))
    fig.savefig(path, dpi=110)
    return fig


def make_plots(rows: list[Row], out: Path) -> tuple[list[Path], list[Skip]]:
    """All plots of every (dataset, model); returns the PNGs and a Skip for each left out."""
    plots, skipped = [], []
    panels = {}
    for row in rows:
        panels.setdefault((row.dataset, row.model), []).append(row)
    for (dataset, model), group in panels.items():
        title = f"{dataset} / {model}"
        path = out / f"acc_{slug(dataset)}_{slug(model)}.png"
        plot_accuracy(group, title, path)
        plots.append(path)
        for prefix, key_fmt, what, ylabel, log in LAYER_PLOTS:
            key = key_fmt.format("<layer>")
            with_data = [row for row in group if any(r.layers(key_fmt) for r in row.runs)]
            name = f"{prefix}_{slug(dataset)}_{slug(model)}.png"
            if not with_data:
                skipped.append(Skip(name, f"no run of {title} logged {key}", "plot not drawn"))
                continue
            without = [row for row in group if row not in with_data]
            if without:
                rules = ", ".join(dict.fromkeys(row.runs[0].names[2] for row in without))
                why = f"{len(without)} of {len(group)} rows logged no {key} ({rules})"
                skipped.append(Skip(name, why, "plot missing some rows"))
            path = out / name
            plot_layers(with_data, key_fmt, f"{title}: {what}", ylabel, path, log)
            plots.append(path)
    return plots, skipped
