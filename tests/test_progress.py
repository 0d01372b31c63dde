"""The per-epoch log line says how long the epoch took, the time since start (labelled) and the
ETA of the epochs left."""

import logging
import re

import pytest

from fdfa.train import train
from tests.helpers import compose_config, synthetic_overrides

LINE = re.compile(
    r"^epoch (\d+) step (\d+) \| .* \| epoch ([\d.]+) s, ([\d.]+) s since start"
    r"(?:, ETA (?:\d+h \d\dm|\d+m \d\ds|\d+ s) for (\d+) more epochs?)?$"
)


def epoch_lines(caplog):
    lines = [r.getMessage() for r in caplog.records if r.name == "fdfa.train"]
    return [m.groups() for m in map(LINE.match, lines) if m]


def test_epoch_line_has_epoch_time_time_since_start_and_eta(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fdfa.train")
    # 8 steps an epoch; max_steps=20 ends the run in epoch 3 of 5
    cfg = compose_config(
        synthetic_overrides("trainer.epochs=5", "trainer.max_steps=20", "model.width=16")
    )
    train(cfg, tmp_path)
    lines = epoch_lines(caplog)
    assert [(e, s, left) for e, s, _, _, left in lines] == [
        ("1", "8", "2"),  # min(5 - 1 epochs, the 12 steps left in 8-step epochs)
        ("2", "16", "1"),
        ("3", "20", None),  # the last: no ETA
    ]
    epoch_times = [float(t) for _, _, t, _, _ in lines]
    since_start = [float(t) for _, _, _, t, _ in lines]
    assert all(t >= 0 for t in epoch_times)  # an idle machine runs these epochs in < 0.05 s
    assert since_start[-1] == pytest.approx(sum(epoch_times), abs=0.15)  # 0.1 s rounding
