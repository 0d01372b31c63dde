"""The settings a study's trials share, kept in the study so that a rerun with other settings
cannot join it (a 2-epoch trial must never compete with 1-epoch ones, nor confirmation runs pool
two widths).

A trial's settings are its job's resolved config, flat (``trainer.epochs: 1``), without the
searched params and without the keys that do not change a run's results, the ones the report
ignores when it compares runs (fdfa.report: seed, loggers, metrics, device, data root, ...).
The first sweep of a study records them as the study user attr ``fdfa:settings``; every later
command on that study compares its own before any trial runs and stops with one line naming the
keys that differ. The sweeper's own keys (``hydra.sweeper.n_trials``, ``n_jobs``,
``confirm_seeds``, ...) live under ``hydra``, so a rerun may change them: that is how a study
grows or resumes.
"""

from __future__ import annotations

import json
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fdfa.errors import FdfaError
from fdfa.report.rundata import relevant_config
from fdfa.report.values import flatten

from ._space import override_value

SETTINGS_ATTR = "fdfa:settings"  # study user attr: {flat key: value} every trial shares
SHOWN = 4  # differing keys named in the message, at most


def shared_settings(job_config: DictConfig, searched: list[str]) -> dict[str, Any]:
    """What every trial of this sweep shares: ``job_config`` (one trial's) resolved and flat,
    without hydra, the searched keys (and the nodes under them) and the keys that do not change
    results."""
    config = {  # hydra's own node resolves only inside a job
        key: OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
        for key, node in job_config.items()
        if key != "hydra"
    }
    flat = relevant_config(flatten(config))
    kept = {
        k: v for k, v in flat.items() if not any(k == s or k.startswith(s + ".") for s in searched)
    }
    return json.loads(json.dumps(kept, sort_keys=True))  # as the storage gives it back


def check_settings(study, settings: dict[str, Any]) -> None:
    """Record ``settings`` in a study that has none; refuse (FdfaError, one line) when the study
    holds other ones. Call under the study's lock."""
    recorded = study.user_attrs.get(SETTINGS_ATTR)
    if recorded is None:
        study.set_user_attr(SETTINGS_ATTR, settings)
        return
    differing = sorted(k for k in {*recorded, *settings} if recorded.get(k) != settings.get(k))
    if not differing:
        return
    shown = differing[:SHOWN]
    more = f" and {len(differing) - SHOWN} more" if len(differing) > SHOWN else ""
    changes = ", ".join(
        f"{k}: {_text(recorded, k)} in the study, {_text(settings, k)} now" for k in shown
    )
    old = " ".join(f"{k}={_text(recorded, k)}" for k in shown)
    raise FdfaError(
        f"study {study.study_name!r} was run with other settings ({changes}{more}); "
        "its trials must share them: start a new study with hydra.sweeper.study_name=<new name> "
        f"(and a new hydra.sweep.dir), or rerun with the study's settings ({old}{more})"
    )


def _text(settings: dict, key: str) -> str:
    if key not in settings:
        return "<unset>"
    value = settings[key]
    return json.dumps(value) if isinstance(value, (list, dict)) else override_value(value)
