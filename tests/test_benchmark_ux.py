"""What a person sees of a benchmark (``python run.py -m sweep=benchmark``): the per-run progress
lines, the overall bar with its ETA on a terminal (fdfa.progress.overall_bar,
hydra_plugins/fdfa_optuna_sweeper/_overall.py), and the W&B runs grouped per benchmark with the
comparison table (fdfa/study_report.py), TensorBoard's hparams naming rule and stage.

The slow test runs a 2-rule benchmark (bp, and fdfa_ema: a rule whose name is not its
algorithm's) with 1 trial and 1 seed each, ``logger=wandb`` offline, on a pseudo-terminal, and
reads back its output and its offline W&B run files.
"""

import csv
import io
import json
import os
import pty
import re
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution

from fdfa.loggers import hparams, run_name
from fdfa.progress import clock, overall_bar
from hydra_plugins.fdfa_optuna_sweeper._overall import OverallProgress
from hydra_plugins.fdfa_optuna_sweeper._plan import Plan
from tests.helpers import REPO
from tests.sweep_helpers import TINY, sqlite_url
from tests.wandb_records import find_run_files, read_run

NAMES = {"algorithm": "fdfa", "model": "fc", "dataset": "fake"}


# ------------------------------------------------------------------------- fast


def test_overall_bar_shows_runs_done_time_and_eta_from_this_commands_mean_run_time():
    assert overall_bar(6, 16, 120.0, 6) == (
        "[#########...............] 6/16 runs, 2m 00s, ETA 3m 20s"  # 120 s / 6 runs x 10 left
    )
    # resumed: 4 runs were done before this command; its 2 runs took 60 s, 6 are left
    assert overall_bar(6, 12, 60.0, 2, width=12).endswith("6/12 runs, 1m 00s, ETA 3m 00s")
    assert overall_bar(0, 4, 3.0, 0, width=4) == "[....] 0/4 runs, 3 s, ETA after the first run"
    assert overall_bar(4, 4, 3725.0, 4, width=4) == "[####] 4/4 runs, 1h 02m, all done"
    assert clock(59.6) == "1m 00s" and clock(7) == "7 s"


def test_a_rules_runs_name_and_tag_their_rule_and_stage():
    """In a benchmark the rule stands in for the algorithm in a run's name (fdfa_ema runs
    algorithm fdfa), and TensorBoard's hparams carry rule and stage."""
    job = {"kind": "confirm", "number": None, "group": "bench", "rule": "fdfa_ema"}
    config = {"seed": 2, "sweep_job": job}
    assert run_name(NAMES, config, "confirm") == "fdfa_ema-fc-fake-seed2-confirm"
    entry = hparams(config, NAMES)
    assert (entry["stage"], entry["rule"], entry["algorithm"]) == ("confirm", "fdfa_ema", "fdfa")
    plain = hparams({"seed": 0}, NAMES)
    assert plain["stage"] == "train" and "rule" not in plain and plain["algorithm"] == "fdfa"
    assert run_name(NAMES, {"seed": 0}) == "fdfa-fc-fake-seed0"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_overall_bar_is_drawn_on_a_terminal_only_and_once_per_change(tmp_path):
    study = optuna.create_study(storage=sqlite_url(tmp_path), direction="maximize")
    study.add_trial(optuna.trial.create_trial(value=0.5, params={}, distributions={}))
    plan = Plan(
        space={}, fixed=[], sweep_dir=tmp_path, study_name=study.study_name,
        url=sqlite_url(tmp_path), seed=0, trial_seed=0,
    )  # fmt: skip
    studies = [(plan, study, None)]
    assert OverallProgress.on_terminal(studies, 3, 2, io.StringIO()) is None  # a CI log
    screen = Terminal()
    overall = OverallProgress.on_terminal(studies, 3, 2, screen)
    overall.draw()
    overall.draw()  # nothing changed: no second line
    trial = study.ask({"x": FloatDistribution(0, 1)})
    study.tell(trial, 0.7)
    run = tmp_path / "confirm" / "seed1"  # a finished confirmation run (seeds: 1, 2)
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"status": "completed", "selected/test/acc": 0.6}))
    overall.draw()
    lines = screen.getvalue().splitlines()
    assert len(lines) == 2, lines
    first = r"overall \[#{5}\.{19}\] 1/5 runs, \d+ s, ETA after the first run"  # 1 done before
    assert re.fullmatch(first, lines[0])
    assert re.fullmatch(r"overall \[#{14}\.{10}\] 3/5 runs, \d+ s, ETA \d+ s", lines[1])


# ------------------------------------------------------------------------- python run.py -m


def run_on_terminal(args: list[str], home: Path, timeout: float = 300) -> tuple[int, str]:
    """``python run.py ARGS`` with stdout and stderr on a pseudo-terminal, W&B offline; returns
    (exit code, output)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "FDFA_WANDB"))}
    env.update(PYTHONPATH=str(REPO), WANDB_MODE="offline", WANDB_SILENT="true", COLUMNS="200")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        env[var] = str(home)
    main, child = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "run.py"), *args],
        cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=child, stderr=child,
    )  # fmt: skip
    os.close(child)
    chunks, deadline = [], time.time() + timeout
    while time.time() < deadline:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # the child closed the terminal: it has exited
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(main)
    try:
        code = proc.wait(timeout=max(deadline - time.time(), 1))
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
    return code, b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")


@pytest.mark.slow
def test_benchmark_on_a_terminal_prints_runs_and_bar_and_groups_its_wandb_runs(tmp_path):
    sweep_dir, rules = tmp_path / "bench", ["bp", "fdfa_ema"]
    args = ["-m", "sweep=benchmark", *[o for o in TINY if o != "logger=none"], "logger=wandb"]
    args += ["benchmark.rules=[bp,fdfa_ema]", "benchmark.trials=1", "benchmark.seeds=1"]
    args += ["hydra.sweeper.study_name=bux", f"hydra.sweep.dir={sweep_dir}"]
    code, out = run_on_terminal(args, tmp_path / "home")
    assert code == 0, out[-4000:]

    # one line per trial and seed run: rule, trial, value, best so far, what is left
    url = sqlite_url(sweep_dir)
    for rule in rules:
        (trial,) = optuna.load_study(study_name=f"bux-{rule}", storage=url).trials
        line = f"[{rule}] trial 0 complete: val/acc {trial.value:.4f}; best {trial.value:.4f} "
        assert line + "(trial 0), 0 trial(s) left" in out, out
        summary = json.loads((sweep_dir / rule / "confirm" / "seed1" / "summary.json").read_text())
        seed_line = f"[{rule}] seed 1 done: selected/test/acc {summary['selected/test/acc']:.4f}"
        assert seed_line + " (0 seed run(s) left)" in out
    # the overall bar on the terminal: from none to all 4 runs, one line per change
    bars = re.findall(r"^overall \[[#.]+\] (\d)/4 runs, .*$", out, re.MULTILINE)
    assert bars == ["0", "1", "2", "3", "4"], out
    assert out.count(", all done") == 1 and "ETA after the first run" in out

    # W&B: every run of the benchmark in its group, job types telling the stages apart
    runs = {}
    for path in find_run_files(sweep_dir):
        run = read_run(path)
        runs[run.name] = run
    expected = {
        "bp-fc-fake-seed0-trial0": "trial",
        "fdfa_ema-fc-fake-seed0-trial0": "trial",
        "bp-fc-fake-seed1-confirm": "confirm",
        "fdfa_ema-fc-fake-seed1-confirm": "confirm",
        "study-bux-bp": "study",
        "study-bux-fdfa_ema": "study",
        "benchmark-bux": "benchmark",
    }
    assert {name: run.job_type for name, run in runs.items()} == expected
    assert {run.group for run in runs.values()} == {"bux"}
    assert {"fdfa_ema", "fdfa"} <= set(runs["fdfa_ema-fc-fake-seed1-confirm"].tags)
    # the report's table, as a W&B table of the benchmark's run
    with (sweep_dir / "report" / "results.csv").open() as f:
        columns, *rows = list(csv.reader(f))
    files = next(p.parent for p in find_run_files(sweep_dir / "report")) / "files"
    table = json.loads(next(files.rglob("comparison_*.table.json")).read_text())
    assert table["columns"] == columns and len(table["data"]) == len(rows) == 2
    at = {name: i for i, name in enumerate(columns)}
    for row, logged in zip(rows, table["data"]):
        assert logged[at["chosen_params"]] == row[at["chosen_params"]]
        mean = at["selected_test_acc_mean"]
        assert logged[mean] == pytest.approx(float(row[mean]))  # a number, not text
    assert runs["benchmark-bux"].summary["rows"] == 2
