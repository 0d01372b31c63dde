"""The W&B logger, offline only: every run is read back from the file wandb writes."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from fdfa.errors import FdfaError
from fdfa.loggers import WandbLogger
from fdfa.train import train
from fdfa.validate import validate_config
from tests.helpers import REPO, compose_config, synthetic_overrides
from tests.wandb_records import find_run_files, read_run

NAMES = {"algorithm": "fdfa", "model": "fc", "dataset": "mnist"}


@pytest.fixture(autouse=True)
def offline_wandb(tmp_path, monkeypatch):
    """No network, no prompt, nothing written outside tmp_path; runs write into their run dir."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    for var in ("WANDB_DIR", "WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_ENTITY", "WANDB_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(
        "fdfa.loggers._ONLINE_FAILED", None
    )  # no earlier test's failed online start


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
    assert run.history[0]["align/fc1/cos"] == 0.5 and run.history[0]["step"] == 4
    assert run.step_metrics["test/*"] == run.step_metrics["train/*"] == "epoch"
    assert run.step_metrics["align/*"] == "step"
    assert (run.name, run.job_type) == ("fdfa-fc-mnist-seed3", "train")
    assert run.summary["test/acc"] == 0.75 and run.summary["align/mean_cos"] == 0.25
    assert run.summary["status"] == "completed" and run.exit_code == 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "status, exit_code", [("failed", 1), ("pruned", 0), ("diverged", 0), ("completed", 0)]
)
def test_only_a_failed_run_is_finished_with_a_nonzero_exit_code(tmp_path, status, exit_code):
    """A pruned trial or a diverged run ended as training meant to: W&B shows it finished, with
    its status in the summary; a run that raised shows as failed."""
    logger = WandbLogger(out_dir=str(tmp_path), run_config={}, names=NAMES, mode="offline")
    logger.log_metrics({"step": 1, "train/loss": 2.0}, step=1)
    logger.finish({"status": status})
    logger.finish({"status": status})  # a second call does nothing
    run = the_run(tmp_path)
    assert run.exit_code == exit_code and run.summary["status"] == status


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
    message = "logger.wandb.init_timeout must be a finite number > 0, got inf"
    with pytest.raises(FdfaError, match=message):  # in Python
        WandbLogger(out_dir=str(tmp_path), init_timeout=float("inf"))
    with pytest.raises(FdfaError, match=message):  # in the config, before any run starts
        validate_config(compose_config(["logger=wandb", "logger.wandb.init_timeout=inf"]))


def test_config_takes_mode_from_the_environment_and_no_group(monkeypatch):
    cfg = compose_config(["logger=wandb"]).logger.wandb
    assert (cfg.mode, cfg.group, cfg.project) == ("offline", None, "fdfa")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("FDFA_WANDB_GROUP", "study-7")  # no longer read: sweep_job.group is
    cfg = compose_config(["logger=csv_wandb"]).logger
    assert (cfg.wandb.mode, cfg.wandb.group) == ("disabled", None)
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


def test_trial_and_confirm_runs_are_named_and_typed_by_how_the_job_runs(tmp_path):
    def one_run(sub: str, config: dict):
        logger = WandbLogger(out_dir=str(tmp_path / sub), run_config=config, names=NAMES)
        logger.finish({"status": "completed"})
        run = the_run(tmp_path / sub)
        return run.name, run.job_type

    assert one_run("plain", {"seed": 0}) == ("fdfa-fc-mnist-seed0", "train")
    trial = {"kind": "trial", "number": 7, "group": "study-7"}  # as the sweeper sets sweep_job
    assert one_run("trial", {"seed": 1, "sweep_job": trial}) == (
        "fdfa-fc-mnist-seed1-trial7",
        "trial",
    )
    assert the_run(tmp_path / "trial").group == "study-7"
    confirm = {"kind": "confirm", "number": None, "group": "study-7"}  # a study's best, again
    assert one_run("confirm", {"seed": 2, "sweep_job": confirm}) == (
        "fdfa-fc-mnist-seed2-confirm",
        "confirm",
    )
    assert one_run("plain-again", {"seed": 0}) == ("fdfa-fc-mnist-seed0", "train")


def test_wandb_dir_is_honoured_unless_logger_wandb_dir_is_set(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "from_env"))
    for sub, wandb_dir in (("a", None), ("b", str(tmp_path / "explicit"))):
        logger = WandbLogger(out_dir=str(tmp_path / sub), names=NAMES, dir=wandb_dir)
        logger.finish({"status": "completed"})
    assert the_run(tmp_path / "from_env").exit_code == 0
    assert the_run(tmp_path / "explicit").exit_code == 0
    assert find_run_files(tmp_path / "a") == find_run_files(tmp_path / "b") == []
    assert (tmp_path / "a" / "wandb_id").is_file()  # the id stays with the run dir


KILLED_JOB = """
import os, signal, sys
from fdfa.train import train
from fdfa.validate import validate_config
from tests.helpers import compose_config, synthetic_overrides

class KillAfterEpoch2:  # as a job killed by the cluster after epoch 2's checkpoint
    def on_evaluation(self, run, record):
        if record["epoch"] == 2:
            os.kill(os.getpid(), signal.SIGKILL)

cfg = compose_config(synthetic_overrides(*sys.argv[2:]))
train(cfg, sys.argv[1], callbacks=[KillAfterEpoch2()])
"""


@pytest.mark.slow
def test_a_killed_and_resumed_run_is_one_wandb_run_without_repeated_steps(tmp_path):
    """Offline, wandb starts a new session file for the resumed run; it must hold the whole
    history once, and be the only session ``wandb sync`` would upload for this run."""
    out = tmp_path / "run"
    overrides = ["trainer.epochs=4", "metrics.every_n_steps=3", "logger=wandb"]
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}  # its own wandb-core,
    env["PYTHONPATH"] = str(REPO)  # as a job started by itself (not this process's service)
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_JOB, str(out), *synthetic_overrides(*overrides)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run_id = (out / "wandb_id").read_text().strip()
    assert [p.name.split("-")[-1] for p in find_run_files(out)] == [f"{run_id}.wandb"]

    summary = train(compose_config(synthetic_overrides(*overrides)), out)  # resumes at epoch 3
    assert summary["epochs"] == 4 and summary["status"] == "completed"
    run = the_run(out)  # exactly one session left under offline-run-*
    assert run.run_id == run_id and run.exit_code == 0
    steps = [h["_step"] for h in run.history]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted({r["step"] for r in records})  # each step once, in order, all of them
    assert [h["epoch"] for h in run.history if "test/acc" in h] == [1, 2, 3, 4]
    assert len(list((out / "wandb").glob(f"superseded-offline-run-*-{run_id}"))) == 1
    dry = subprocess.run(
        [sys.executable, "-m", "wandb", "sync", "--dry-run", str(out / "wandb")],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    would_sync = [line for line in (dry.stdout + dry.stderr).splitlines() if ".wandb" in line]
    assert len(would_sync) == 1 and run_id in would_sync[0], dry.stdout + dry.stderr


def test_an_online_resume_sends_only_what_the_wandb_run_lacks(tmp_path, monkeypatch):
    """Online, wandb reports where the resumed run's history ends (``starting_step``)."""
    import wandb

    (tmp_path / "wandb_id").write_text("resumeme1\n")
    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "resumed", property(lambda self: True))
    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "starting_step", property(lambda self: 9))
    logger = WandbLogger(out_dir=str(tmp_path), names=NAMES, resumed=True)
    for step in (4, 8, 12):  # replayed, replayed, new
        logger.log_metrics({"epoch": step // 4, "test/acc": step / 100}, step=step)
    logger.finish({"status": "completed"})
    run = the_run(tmp_path)
    assert run.run_id == "resumeme1" and [h["_step"] for h in run.history] == [12]


@pytest.mark.slow
def test_online_without_a_server_waits_init_timeout_once_then_logs_offline(
    tmp_path, monkeypatch, caplog
):
    """W&B online with a key but no reachable server (here: a port that accepts connections and
    never answers, as a network that drops packets) waits ``init_timeout`` once, says so in one
    warning, and logs the run offline; the next run of the process goes offline at once."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)  # connections complete, nothing ever answers
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    timeout = 4
    try:
        with caplog.at_level(logging.WARNING, logger="fdfa.loggers"):
            took = []
            for sub in ("first", "second"):
                start = time.monotonic()
                logger = WandbLogger(
                    out_dir=str(tmp_path / sub), names=NAMES, mode="online", init_timeout=timeout
                )
                took.append(time.monotonic() - start)
                logger.log_metrics({"step": 1, "train/loss": 2.0}, step=1)
                logger.finish({"status": "completed"})
    finally:
        server.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "init_timeout=4 s" in warnings[0], warnings
    assert "log offline" in warnings[0]
    # wandb's service start-up (a few s) plus the timeout; its default would be 90 s
    assert timeout <= took[0] < timeout + 30 and took[1] < timeout, took
    for sub in ("first", "second"):
        run = the_run(tmp_path / sub)
        assert run.exit_code == 0 and [h["train/loss"] for h in run.history] == [2.0]
