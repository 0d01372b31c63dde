"""The sweep's outputs beside the trials: optimization_results.yaml (written atomically, as several
workers may write it) and Optuna's plots as PNGs."""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import optuna

from ._space import one_line

log = logging.getLogger(__name__)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)  # several workers may write the same report


def readable_colours(fig) -> None:
    """Colours that stand out on the axes' grey: Optuna's parallel-coordinate plot draws low
    values in "Blues" near white, and its intermediate-values plot gives half the trials pale
    tab20 shades. Here lines coloured by value take a dark-to-green map (the colour bar follows),
    and the trials' lines (and their legend) dark colours of the same map, in trial order."""
    import matplotlib as mpl
    from matplotlib.colors import ListedColormap
    from matplotlib.ticker import MaxNLocator

    colours = mpl.colormaps["viridis"](np.linspace(0.0, 0.85, 256))  # no pale yellow end
    for ax in fig.axes:
        for collection in ax.collections:
            if collection.get_array() is not None:
                collection.set_cmap(ListedColormap(colours, name="viridis_dark"))
        legend = ax.get_legend()
        lines = [line for line in ax.get_lines() if line.get_label().startswith("Trial")]
        if legend is None or len(lines) < 2:
            continue
        for line, colour in zip(lines, colours[np.linspace(0, 255, len(lines)).astype(int)]):
            line.set_color(colour)
        ax.legend(handles=lines, bbox_to_anchor=(1.05, 1.0), loc="upper left", borderaxespad=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are epochs


def save_plots(study: optuna.Study, out_dir: Path) -> None:
    """Optuna's history, importance, parallel-coordinate and learning-curve plots as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    if importlib.util.find_spec("sklearn") is None:  # fANOVA, the default, needs scikit-learn
        evaluator = optuna.importance.PedAnovaImportanceEvaluator()
    else:
        evaluator = None
    figures = {
        "optimization_history": plots.plot_optimization_history,
        "param_importances": lambda s: plots.plot_param_importances(s, evaluator=evaluator),
        "parallel_coordinate": plots.plot_parallel_coordinate,
        "intermediate_values": plots.plot_intermediate_values,
    }
    for name, plot in figures.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # these plots are marked experimental
                axes = plot(study)
            fig = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
            readable_colours(fig)
            tmp = out_dir / f".{name}.{os.getpid()}.png"
            fig.savefig(tmp, dpi=120, bbox_inches="tight")
            os.replace(tmp, out_dir / f"{name}.png")
            plt.close(fig)
        except Exception as err:  # e.g. too few trials for importances: the rest still gets made
            log.info("plot %s skipped: %s", name, one_line(err))
