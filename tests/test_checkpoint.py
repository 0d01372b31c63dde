"""Checkpoints, resume and divergence: nothing computed is lost, nothing half-written is loaded."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from fdfa import checkpoint
from fdfa.errors import DivergedError, FdfaError
from fdfa.rules import FDFA
from fdfa.train import Run, train
from tests.helpers import REPO, compose_config, crash_at_step, run_cli, synthetic_overrides


def records(run_dir):
    """metrics.jsonl without the wall-clock field (the only thing a resume may change)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "time_s"} for line in lines]


OVERRIDES = synthetic_overrides(
    "algorithm=fdfa", "trainer.epochs=3", "trainer.ckpt_every_n_steps=3"
)


@pytest.mark.parametrize("perturbation", ["gaussian", "rademacher"])
def test_resume_mid_epoch_is_bit_exact(tmp_path, monkeypatch, perturbation):
    overrides = [*OVERRIDES, f"algorithm.perturbation={perturbation}"]
    train(compose_config(overrides), tmp_path / "straight")

    crash_at_step(monkeypatch, FDFA, 14)  # after the checkpoint at step 12, mid epoch 2
    with pytest.raises(KeyboardInterrupt):
        train(compose_config(overrides), tmp_path / "resumed")
    saved = checkpoint.load(tmp_path / "resumed" / "last.ckpt")
    assert saved["progress"]["step"] == 12 and saved["progress"]["batch"] == 4
    summary = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert summary["status"] == "interrupted"  # a KeyboardInterrupt with no handler, too
    monkeypatch.undo()

    summary = train(compose_config(overrides), tmp_path / "resumed")
    assert summary["status"] == "completed" and summary["steps"] == 24
    assert records(tmp_path / "resumed") == records(tmp_path / "straight")
    a = torch.load(tmp_path / "straight" / "last.ckpt", weights_only=True)["rule"]
    b = torch.load(tmp_path / "resumed" / "last.ckpt", weights_only=True)["rule"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # weights and feedback, bit for bit


@pytest.mark.slow
def test_sigkill_mid_epoch_then_rerun_finishes_like_an_uninterrupted_run(tmp_path):
    args = synthetic_overrides(
        "algorithm=fdfa",
        "model.width=256",
        "dataset.train_size=2112",  # 2048 to train on after the 64 validation images
        "dataset.image_shape=[1,28,28]",
        "trainer.epochs=12",
        "trainer.ckpt_every_n_steps=8",
        "trainer.device=cpu",
    )
    killed = tmp_path / "killed"
    cmd = [sys.executable, str(REPO / "run.py"), *args, f"hydra.run.dir={killed}"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # wait for a checkpoint in the second epoch (64 steps/epoch)
            ckpt = killed / "last.ckpt"
            if ckpt.exists() and checkpoint.load(ckpt)["progress"]["step"] >= 72:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    at_kill = checkpoint.load(killed / "last.ckpt")["progress"]
    assert 72 <= at_kill["step"] < 12 * 64, "the run was not killed mid-training"
    assert not (killed / "summary.json").exists()

    res = run_cli([*args, f"hydra.run.dir={killed}"])
    assert res.returncode == 0, res.stderr
    assert "resuming from" in res.stdout + res.stderr
    straight = tmp_path / "straight"
    train(compose_config(args), straight)
    assert records(killed) == records(straight)
    assert all("val/acc" in r for r in records(killed) if "test/acc" in r)
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["steps"] == 12 * 64
    selection = ("best/val/acc", "best/epoch", "selected/test/acc")
    assert [summary[k] for k in selection] == [
        json.loads((straight / "summary.json").read_text())[k] for k in selection
    ]
    a, b = (checkpoint.load(d / "best.ckpt") for d in (killed, straight))
    assert a["record"]["epoch"] == summary["best/epoch"] and a["record"] == {
        **b["record"],
        "time_s": a["record"]["time_s"],
    }
    assert all(torch.equal(a["rule"][k], b["rule"][k]) for k in a["rule"])


@pytest.mark.slow
def test_finished_run_rerun_does_nothing_and_says_so(tmp_path):
    args = [*synthetic_overrides("trainer.epochs=1"), f"hydra.run.dir={tmp_path}"]
    assert run_cli(args).returncode == 0
    before = (tmp_path / "metrics.jsonl").read_text()
    mtime = (tmp_path / "last.ckpt").stat().st_mtime_ns
    res = run_cli(args)
    assert res.returncode == 0 and "already finished; nothing to do" in res.stdout + res.stderr
    assert (tmp_path / "metrics.jsonl").read_text() == before
    assert (tmp_path / "last.ckpt").stat().st_mtime_ns == mtime


def test_more_epochs_continue_a_finished_run(tmp_path):
    train(compose_config(synthetic_overrides("trainer.epochs=1")), tmp_path)
    summary = train(compose_config(synthetic_overrides("trainer.epochs=2")), tmp_path)
    assert summary["epochs"] == 2 and summary["steps"] == 16
    assert [r["epoch"] for r in records(tmp_path)] == [1, 2]


def test_crash_while_writing_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    train(compose_config(synthetic_overrides("trainer.epochs=1")), tmp_path)
    good = (tmp_path / "last.ckpt").read_bytes()

    def torn_save(obj, f):
        f.write(good[: len(good) // 2])  # half a checkpoint, then the process "dies"
        raise OSError("simulated crash during write")

    monkeypatch.setattr(checkpoint.torch, "save", torn_save)
    with pytest.raises(OSError, match="simulated crash"):
        checkpoint.save_atomic({"format": checkpoint.FORMAT}, tmp_path / "last.ckpt")
    assert (tmp_path / "last.ckpt").read_bytes() == good
    monkeypatch.undo()
    assert checkpoint.load(tmp_path / "last.ckpt")["progress"]["epoch"] == 1


def test_truncated_checkpoint_is_refused_with_advice(tmp_path):
    train(compose_config(synthetic_overrides("trainer.epochs=1")), tmp_path)
    data = (tmp_path / "last.ckpt").read_bytes()
    (tmp_path / "last.ckpt").write_bytes(data[: len(data) // 3])
    with pytest.raises(FdfaError, match="corrupt or unreadable.*trainer.resume"):
        Run(compose_config(synthetic_overrides("trainer.epochs=2")), tmp_path).setup()


def test_checkpoint_of_another_config_is_refused(tmp_path):
    train(compose_config(synthetic_overrides("trainer.epochs=1")), tmp_path)
    with pytest.raises(FdfaError, match=r"another config \(optimizer.lr: 0.0001 .* 0.001 now"):
        Run(
            compose_config(synthetic_overrides("trainer.epochs=2", "optimizer.lr=1e-3")), tmp_path
        ).setup()
    fresh = train(
        compose_config(synthetic_overrides("optimizer.lr=1e-3", "trainer.epochs=1",
                                           "trainer.resume=never")),
        tmp_path,
    )  # fmt: skip
    assert fresh["steps"] == 8 and len(records(tmp_path)) == 1


def test_checkpoint_holds_every_piece_of_state(tmp_path):
    train(compose_config(synthetic_overrides("algorithm=dkp", "trainer.epochs=1")), tmp_path)
    ckpt = checkpoint.load(tmp_path / "last.ckpt")
    assert any(k.startswith("feedback.") for k in ckpt["rule"])
    assert any(k.startswith("model.") for k in ckpt["rule"])
    assert set(ckpt["optimizers"]) == {"optimizer", "rule.feedback_optimizer"}
    assert ckpt["scheduler"]["last_epoch"] == 1
    assert set(ckpt["rng"]) == {"torch", "cuda", "numpy", "python"}
    assert len(ckpt["records"]) == 1 and ckpt["progress"]["step"] == 8


@pytest.mark.slow
def test_divergence_stops_at_once_with_a_clear_line(tmp_path):
    res = run_cli(
        [*synthetic_overrides("optimizer=sgd", "optimizer.lr=1e12", "algorithm=bp"),
         f"hydra.run.dir={tmp_path}"]
    )  # fmt: skip
    assert res.returncode != 0 and "Traceback" not in res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: training diverged: loss is ")
    assert "at step" in lines[0] and "lr 1e+12" in lines[0]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "diverged"


def test_deferred_loss_checks_name_the_same_first_diverged_step(tmp_path, monkeypatch):
    """On a GPU the losses are checked every LOSS_CHECK_EVERY steps, not each step (a check is a
    device sync); the error must still name the first step whose loss was not finite."""
    overrides = synthetic_overrides("optimizer=sgd", "optimizer.lr=1e12", "algorithm=bp")
    messages = []
    for every in (1, 7):
        monkeypatch.setattr(Run, "LOSS_CHECK_EVERY", {"cpu": every})
        with pytest.raises(DivergedError) as err:
            train(compose_config(overrides), tmp_path / str(every))
        messages.append(str(err.value))
    assert messages[0] == messages[1] and "at step" in messages[0]
