"""The W&B logger, offline only: every run is read back from the file wandb writes."""

import logging
import sys
import time

import pytest

from fdfa.errors import FdfaError
from fdfa.loggers import WandbLogger
from fdfa.train import train
from tests.helpers import compose_config, synthetic_overrides
from tests.wandb_records import find_run_files, read_run

NAMES = {"algorithm": "fdfa", "model": "fc", "dataset": "mnist"}


@pytest.fixture(autouse=True)
def offline_wandb(tmp_path, monkeypatch):
    """No network, no prompt, nothing written outside tmp_path."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    for var in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_ENTITY", "WANDB_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("FDFA_WANDB_GROUP", raising=False)


def the_run(root, timeout_s=10.0):
    """The one run under ``root``, once its file holds the exit record: wandb's offline writer
    runs in its own process and can finish the file a moment after ``run.finish()`` returns
    (wandb 0.31: 2 of 12 runs read at once lacked history, summary and exit code; 2 s later all
    had them)."""
    deadline = time.monotonic() + timeout_s
    while True:
        files = find_run_files(root)
        assert len(files) == 1, files
        run = read_run(files[0])
        if run.exit_code is not None or time.monotonic() > deadline:
            return run
        time.sleep(0.05)


@pytest.mark.slow
def test_offline_run_holds_config_tags_history_and_summary(tmp_path):
    logger = WandbLogger(
        out_dir=str(tmp_path),
        run_config={"seed": 3, "optimizer": {"lr": 1e-4}},
        names=NAMES,
        group="study-1",
        tags=["paper"],
        mode="offline",
    )
    logger.log_metrics({"epoch": 1, "step": 4, "align/mean_cos": 0.25, "align/fc1/cos": 0.5}, 4)
    logger.log_metrics({"epoch": 1, "step": 8, "test/acc": 0.75, "train/loss": 1.5}, step=8)
    logger.finish({"status": "completed", "test/acc": 0.75, "best/test/acc": 0.75})
    run = the_run(tmp_path)
    assert run.config["seed"] == 3 and run.config["optimizer"] == {"lr": 1e-4}
    assert run.tags == ["paper", "fdfa", "fc", "mnist"] and run.group == "study-1"
    assert [h["_step"] for h in run.history] == [4, 8]
    assert run.history[0]["align/fc1/cos"] == 0.5 and "step" not in run.history[0]
    assert run.summary["test/acc"] == 0.75 and run.summary["align/mean_cos"] == 0.25
    assert run.summary["status"] == "completed" and run.exit_code == 0


@pytest.mark.slow
def test_a_failed_run_is_finished_with_a_nonzero_exit_code(tmp_path):
    logger = WandbLogger(out_dir=str(tmp_path), run_config={}, names=NAMES, mode="offline")
    logger.log_metrics({"step": 1, "train/loss": 2.0}, step=1)
    logger.finish({"status": "diverged"})
    logger.finish({"status": "diverged"})  # a second call does nothing
    run = the_run(tmp_path)
    assert run.exit_code == 1 and run.summary["status"] == "diverged"


def test_when_wandb_cannot_start_one_warning_and_training_goes_on(tmp_path, monkeypatch, caplog):
    import wandb

    def no_init(**_):
        raise RuntimeError("api key not configured (no-tty)\nsecond line")

    for broken in ("import", "init"):
        caplog.clear()
        with monkeypatch.context() as patch:
            if broken == "import":
                patch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
            else:
                patch.setattr(wandb, "init", no_init)
            with caplog.at_level(logging.WARNING, logger="fdfa.loggers"):
                logger = WandbLogger(out_dir=str(tmp_path / broken), names=NAMES, mode="online")
                logger.log_metrics({"step": 1, "train/loss": 2.0}, step=1)
                logger.finish({"status": "completed"})
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "\n" not in warnings[0], warnings
        assert "local logs go on" in warnings[0]
        assert ("not installed" if broken == "import" else "api key") in warnings[0]
    assert find_run_files(tmp_path) == []


def test_a_bad_mode_is_a_clear_error(tmp_path):
    with pytest.raises(FdfaError, match="logger.wandb.mode must be one of"):
        WandbLogger(out_dir=str(tmp_path), mode="offlien")


def test_config_takes_mode_and_group_from_the_environment(monkeypatch):
    cfg = compose_config(["logger=wandb"]).logger.wandb
    assert (cfg.mode, cfg.group, cfg.project) == ("offline", None, "fdfa")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("FDFA_WANDB_GROUP", "study-7")
    cfg = compose_config(["logger=csv_wandb"]).logger
    assert (cfg.wandb.mode, cfg.wandb.group) == ("disabled", "study-7")
    assert cfg.csv._target_ == "fdfa.loggers.CSVLogger"


@pytest.mark.slow
def test_a_training_run_writes_test_acc_and_alignment_to_the_wandb_summary(tmp_path):
    cfg = compose_config(
        synthetic_overrides(
            "algorithm=dfa", "trainer.epochs=2", "metrics.every_n_steps=4", "logger=csv_wandb"
        )
    )
    summary = train(cfg, tmp_path)
    run = the_run(tmp_path)
    assert run.exit_code == 0 and run.summary["status"] == "completed"
    assert run.summary["test/acc"] == summary["test/acc"]
    assert run.summary["best/test/acc"] == summary["best/test/acc"]
    for key in ("align/mean_cos", "align/fc1/cos", "align/fc2/angle_deg", "feedback/fc2/cos"):
        assert key in run.summary, key
    assert {"dfa", "prototypes"} <= set(run.tags)
    assert run.config["algorithm"]["_target_"] == "fdfa.rules.DFA"
    assert sorted({h["_step"] for h in run.history}) == [4, 8, 12, 16]
    assert (tmp_path / "metrics.csv").exists()


@pytest.mark.slow
def test_jobs_in_one_process_each_finish_their_run_also_when_one_raises(tmp_path):
    """As in a sweep: a job whose callback raises, then a job that completes."""

    class Boom:
        def on_evaluation(self, run, record):
            raise RuntimeError("stop here")

    cfg = compose_config(synthetic_overrides("trainer.max_steps=2", "logger=wandb"))
    with pytest.raises(RuntimeError, match="stop here"):
        train(cfg, tmp_path / "failed", callbacks=[Boom()])
    train(cfg, tmp_path / "completed")
    failed, completed = the_run(tmp_path / "failed"), the_run(tmp_path / "completed")
    assert (failed.exit_code, failed.summary["status"]) == (1, "failed")
    assert (completed.exit_code, completed.summary["status"]) == (0, "completed")
    assert "test/acc" in failed.summary  # the evaluation logged before the callback raised
