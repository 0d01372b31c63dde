"""The benchmark command runs and reports what it promises (no timing is asserted)."""

import json
import subprocess
import sys

import pytest

from fdfa.bench import main
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
