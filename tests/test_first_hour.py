"""What a newcomer meets in the first hour, as they type it: a stopped run says the command that
resumes it (and that command does), every run ends by saying where it went, and a network of
their own trains from the command line, also from a config dir outside the checkout."""

import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.helpers import REPO, run_cli, synthetic_overrides

# 64 steps an epoch: a signal sent when epoch 1's last.ckpt appears lands inside epoch 2
SLOW = synthetic_overrides("model.width=64", "dataset.train_size=2112", "trainer.device=cpu")

MY_NET = """
import torch.nn as nn
from fdfa.models import BlockNet


class MyNet(BlockNet):
    def __init__(self, input_shape, num_classes, hidden=32):
        super().__init__(input_shape, num_classes)
        c, h, w = input_shape
        flat = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU())
        self.blocks = nn.ModuleList([flat])
        self.head = nn.Linear(hidden, num_classes)
"""


def evaluations(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "test/acc" in r]


def last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


@pytest.mark.slow
def test_a_stopped_default_run_prints_the_command_that_resumes_it(tmp_path):
    """No hydra.run.dir: the run goes to outputs/<name>/<time>/, so the same command alone would
    start afresh; the printed command continues the same run to the end."""
    env = {"PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "0"}
    args = [*SLOW, "trainer.epochs=3"]
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "run.py"), *args],
        cwd=tmp_path, env={**os.environ, **env},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 240
        while not list(tmp_path.glob("outputs/*/*/last.ckpt")) and time.time() < deadline:
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    line = last_line(proc.stderr.read())
    (run_dir,) = tmp_path.glob("outputs/*/*/")
    # in epoch 2, or (a loaded machine) just after epoch 1's checkpoint, before epoch 2 began
    assert line.startswith(
        ("interrupted by SIGINT at epoch 2", "interrupted by SIGINT at epoch 1")
    ), line
    command = line.split("resume with: ", 1)[1]
    assert f"hydra.run.dir={run_dir}" in command
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert summary["epochs"] == len(evaluations(run_dir)) == 1  # epoch 2 did not finish

    argv = shlex.split(command)
    assert argv[:2] == ["python", str(REPO / "run.py")]
    done = subprocess.run(
        [sys.executable, *argv[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, **env},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert [r["epoch"] for r in evaluations(run_dir)] == [1, 2, 3]  # continued, not restarted
    assert list(tmp_path.glob("outputs/*/*/")) == [run_dir]  # no new run dir
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs"] == 3
    assert last_line(done.stdout + done.stderr).endswith(
        f"run dir {run_dir} (summary.json, metrics.jsonl, checkpoints)"
    )


@pytest.mark.slow
def test_your_own_network_by_model_custom_and_from_a_config_dir_outside(tmp_path):
    (tmp_path / "mynet.py").write_text(textwrap.dedent(MY_NET))
    short = [*synthetic_overrides(), "trainer.max_steps=2"]
    res = run_cli(
        ["model=custom", "model._target_=mynet.MyNet", "+model.hidden=8", *short,
         f"hydra.run.dir={tmp_path / 'a'}"], cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["steps"] == 2
    config = (tmp_path / "a" / ".hydra" / "config.yaml").read_text()
    assert "_target_: mynet.MyNet" in config and "hidden: 8" in config

    own = tmp_path / "myconf" / "model"
    own.mkdir(parents=True)
    (own / "mynet.yaml").write_text("_target_: mynet.MyNet\nhidden: 8\n")
    res = run_cli(
        [f"hydra.searchpath=[file://{tmp_path / 'myconf'}]", "model=mynet", *short,
         f"hydra.run.dir={tmp_path / 'b'}"], cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["model"] == "mynet"


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        ([], "error: model._target_ must be set (e.g. model._target_=mynet.MyNet"),
        (["model._target_=nope.Nope"], "error: model._target_=nope.Nope: cannot import nope ("),
        (["model._target_=mynet.Nope"], "error: model._target_=mynet.Nope: mynet has no 'Nope'"),
    ],
)
def test_a_custom_model_without_a_class_is_one_line(tmp_path, args, message):
    (tmp_path / "mynet.py").write_text(textwrap.dedent(MY_NET))
    res = run_cli(
        ["model=custom", *args, *synthetic_overrides(), f"hydra.run.dir={tmp_path / 'r'}"],
        cwd=tmp_path,
    )
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [res.stderr.strip()], res.stderr
    assert res.stderr.startswith(message), res.stderr
