"""The sweep's outputs beside the trials: optimization_results.yaml (written atomically, as several
workers may write it) and Optuna's plots as PNGs."""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from pathlib import Path

import optuna

from ._space import one_line

log = logging.getLogger(__name__)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)  # several workers may write the same report


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
            tmp = out_dir / f".{name}.{os.getpid()}.png"
            fig.savefig(tmp, dpi=120, bbox_inches="tight")
            os.replace(tmp, out_dir / f"{name}.png")
            plt.close(fig)
        except Exception as err:  # e.g. too few trials for importances: the rest still gets made
            log.info("plot %s skipped: %s", name, one_line(err))
