"""run.py as a user types it, in a subprocess, with the run dir in a tmp dir."""

import json

import pytest

from tests.helpers import run_cli

FAKE = [
    "dataset=fake",
    "dataset.train_size=80",
    "dataset.val_size=16",
    "dataset.test_size=32",
    "dataset.batch_size=16",
    "trainer.max_steps=2",
    "logger=none",
]


@pytest.mark.slow
def test_single_run_writes_its_record(tmp_path):
    res = run_cli([*FAKE, "model=cnn", f"hydra.run.dir={tmp_path}"])
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["algorithm"] == "fdfa" and summary["model"] == "cnn"
    assert summary["dataset"] == "fake"
    assert (tmp_path / ".hydra" / "config.yaml").is_file()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
    assert "epoch 1 step 2" in res.stdout + res.stderr  # the per-epoch summary line


@pytest.mark.slow
def test_multirun_over_every_rule(tmp_path):
    res = run_cli(["-m", *FAKE, "algorithm=bp,dfa,dkp,fdfa", f"hydra.sweep.dir={tmp_path}"])
    assert res.returncode == 0, res.stderr
    algos = sorted(json.loads(p.read_text())["algorithm"] for p in tmp_path.glob("*/summary.json"))
    assert algos == ["bp", "dfa", "dkp", "fdfa"]


@pytest.mark.slow
def test_missing_data_offline_is_one_clear_line(tmp_path):
    empty = tmp_path / "nothing here"
    res = run_cli(
        [f"dataset.root={empty}", "dataset.download=false", f"hydra.run.dir={tmp_path / 'run'}"]
    )
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    msg = lines[0]
    assert msg.startswith("error: MNIST not found in ")
    assert str(empty / "MNIST" / "raw") in msg and "train-images-idx3-ubyte.gz" in msg
    assert "dataset.root" in msg and "FDFA_DATA_DIR" in msg
    assert not (tmp_path / "run" / "summary.json").exists()
