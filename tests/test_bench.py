"""The benchmark command runs and reports what it promises (no timing is asserted, except the
phase clock's accounting of known sleeps)."""

import json
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from fdfa.bench import PHASES, PhaseClock, main
from tests.helpers import REPO


def test_bench_reports_step_times_ratios_memory_and_metrics_overhead(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["--models", "fc", "--rules", "bp", "fdfa", "--steps", "2", "--warmup", "1"]
    args += ["--epoch-rules", "--metrics-overhead", "--device", "cpu", "--out", str(out)]
    results = main(args)
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    rows = {r["algorithm"]: r for r in results["steps"]}
    assert set(rows) == {"bp", "fdfa"} and rows["bp"]["ratio_to_bp"] == 1.0
    assert all(r["step_ms"] > 0 for r in rows.values())
    assert rows["fdfa"]["state_mb"] > rows["bp"]["state_mb"]  # feedback + its Adam moments
    overhead = {r["algorithm"]: r for r in results["metrics"]}
    assert overhead["fdfa"]["every_n_steps"] == 1000 and overhead["fdfa"]["overhead_ratio"] > 1
    printed = capsys.readouterr().out
    assert "## fc (cpu)" in printed and "ratio_to_bp" in printed and "overhead_ratio" in printed


@pytest.mark.slow
def test_bench_epoch_runs_take_config_overrides(tmp_path, monkeypatch, mnist_root):
    monkeypatch.chdir(tmp_path)  # the epoch runs write bench/<rule>/
    args = ["--models", "fc", "--rules", "bp", "--steps", "1", "--warmup", "1", "--device", "cpu"]
    args += ["--epoch-rules", "fdfa", "--data-root", str(mnist_root)]
    results = main([*args, "--epoch-overrides", "trainer.max_steps=5"])
    assert results["steps"][0]["cuda_graph"] is False  # graphs are for CUDA steps only
    (row,) = results["epochs"]
    assert row["algorithm"] == "fdfa" and len(row["test_acc"]) == 1
    summary = json.loads((tmp_path / "bench/fdfa/summary.json").read_text())
    assert summary["steps"] == 5 and summary["device"] == "cpu"


def test_ratios_are_always_to_bp(capsys):
    results = main(["--models", "fc", "--rules", "fdfa", "dfa", "--steps", "1", "--warmup", "1",
                    "--epoch-rules", "--device", "cpu"])  # fmt: skip
    assert [r["algorithm"] for r in results["steps"]] == ["bp", "fdfa", "dfa"]
    assert results["steps"][0]["ratio_to_bp"] == 1.0


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["--epoch-overrides", "foo=1"], "error: Could not override 'foo'."),
        (["--epoch-overrides", "trainer.epochs=0"],
         "error: trainer.epochs must be an integer >= 1, got 0"),
        (["--models", "vgg"], "argument --models: invalid choice: 'vgg'"),
        (["--rules", "sgd"], "argument --rules: invalid choice: 'sgd'"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_before_any_timing(args, message):
    res = subprocess.run(
        [sys.executable, "-m", "fdfa.bench", "--device", "cpu", *args],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 2 and "Traceback" not in res.stderr and res.stdout == ""
    assert message in res.stderr.strip().splitlines()[-1]


class SleepyRule(nn.Module):
    """Phases of known length: a forward of 0.05 s that draws for 0.05 s inside it, a feedback
    update of 0.05 s, a real backward and an optimizer step."""

    def __init__(self):
        super().__init__()
        self.model = nn.Linear(2, 1)

    def draw_perturbations(self, n):
        time.sleep(0.05)

    def dual_forward(self, x):
        self.draw_perturbations(len(x))
        time.sleep(0.05)
        return self.model(x).sum()

    def update_feedback(self):
        time.sleep(0.05)

    def train_step(self, x):
        self.dual_forward(x).backward()
        self.update_feedback()


def test_phase_clock_counts_each_phase_once_and_restores_what_it_wrapped():
    rule = SleepyRule()
    optimizer = torch.optim.SGD(rule.parameters(), lr=0.1)
    backward = torch.autograd.backward
    clock = PhaseClock(rule, optimizer, torch.device("cpu"))
    with clock:
        rule.train_step(torch.ones(3, 2))
        optimizer.step()
    now = clock.now
    assert set(now) == {"draw", "forward", "backward", "feedback", "optimizer"} <= set(PHASES)
    assert 0.05 <= now["draw"] < 0.095 and 0.05 <= now["feedback"] < 0.095
    assert 0.05 <= now["forward"] < 0.095  # the nested draw is not counted twice
    assert 0 < now["backward"] < 0.045 and 0 < now["optimizer"] < 0.045
    # the rule's methods, the model's forward, the optimizer and torch are as before
    assert not {"draw_perturbations", "dual_forward", "update_feedback"} & set(vars(rule))
    assert "forward" not in vars(rule.model) and "step" not in vars(optimizer)
    assert torch.autograd.backward is backward


def test_bench_phases_split_every_rules_step(capsys):
    results = main(["--models", "fc", "--rules", "bp", "fdfa", "--steps", "2", "--warmup", "1",
                    "--epoch-rules", "--device", "cpu", "--phases"])  # fmt: skip
    rows = {r["algorithm"]: r for r in results["phases"]}
    phases = [f"{p}_ms" for p in PHASES]
    for row in rows.values():
        assert row["step_ms"] > 0 and row["rest_ms"] >= 0 and all(row[p] >= 0 for p in phases)
        assert row["forward_ms"] > 0 and row["backward_ms"] > 0 and row["optimizer_ms"] > 0
    assert rows["bp"]["draw_ms"] == 0 and rows["bp"]["feedback_ms"] == 0
    assert rows["fdfa"]["draw_ms"] > 0 and rows["fdfa"]["feedback_ms"] > 0
    assert "## fc: phases of a step" in capsys.readouterr().out
