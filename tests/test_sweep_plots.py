"""The sweep's Optuna plots (hydra_plugins/fdfa_optuna_sweeper/_plots.py) draw every trial in a
colour that stands out on the axes' grey, the lowest objective values included."""

import warnings

import matplotlib
import numpy as np
import optuna
from matplotlib.colors import to_rgba
from optuna.visualization import matplotlib as plots

from hydra_plugins.fdfa_optuna_sweeper._plots import readable_colours

matplotlib.use("Agg")
optuna.logging.set_verbosity(optuna.logging.WARNING)


def luminance(rgba) -> float:
    r, g, b, _ = to_rgba(rgba)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def small_study() -> optuna.Study:
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(0))

    def objective(trial):
        lr = trial.suggest_float("lr", 1e-5, 1e-2, log=True)
        momentum = trial.suggest_categorical("momentum", [0.9, 0.99])
        for step in (1, 2):
            trial.report(step * lr * 50 + momentum / 10, step)
        return lr * 100 + momentum / 10

    study.optimize(objective, n_trials=12)
    return study


def test_every_trial_line_is_darker_than_the_grey_background():
    study = small_study()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna's matplotlib plots are experimental
        parallel = plots.plot_parallel_coordinate(study).figure
        intermediate = plots.plot_intermediate_values(study).figure
    for fig in (parallel, intermediate):
        readable_colours(fig)
        fig.canvas.draw()
    background = luminance(parallel.axes[0].get_facecolor())
    (lines,) = [c for c in parallel.axes[0].collections if c.get_array() is not None]
    colours = lines.get_cmap()(lines.norm(np.asarray(lines.get_array())))
    assert max(map(luminance, colours)) < background - 0.15
    trial_lines = [x for x in intermediate.axes[0].get_lines() if x.get_label().startswith("Trial")]
    assert len(trial_lines) == 12
    assert max(luminance(x.get_color()) for x in trial_lines) < background - 0.15
    legend = intermediate.axes[0].get_legend()
    assert [to_rgba(h.get_color()) for h in legend.legend_handles] == [
        to_rgba(x.get_color()) for x in trial_lines
    ]
