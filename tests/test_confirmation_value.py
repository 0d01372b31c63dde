"""A confirmation run's value is its test accuracy at the best-validation epoch
(``selected/test/acc``), never the optimistic max over epochs (``best/test/acc``)."""

import json

from hydra_plugins.fdfa_optuna_sweeper._confirm import confirmed_value


def write_summary(run_dir, **summary):
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def test_confirmation_reads_the_selected_test_accuracy(tmp_path):
    run = write_summary(
        tmp_path / "seed0",
        status="completed",
        **{"selected/test/acc": 0.91, "best/test/acc": 0.95, "test/acc": 0.93},
    )
    assert confirmed_value(run) == 0.91


def test_an_unfinished_or_missing_confirmation_run_has_no_value(tmp_path):
    values = {"selected/test/acc": 0.91, "best/test/acc": 0.95}
    assert confirmed_value(write_summary(tmp_path / "a", status="interrupted", **values)) is None
    assert confirmed_value(tmp_path / "missing") is None
