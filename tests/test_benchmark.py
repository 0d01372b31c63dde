"""The benchmark (``python run.py -m sweep=benchmark``, hydra_plugins/fdfa_optuna_sweeper/
_benchmark.py): every rule tuned in its own study, confirmed on shared fresh seeds, reported.

The slow tests run a 3-rule benchmark (bp, dfa, dkp) with 3 trials and 2 seeds on the tiny
synthetic task: once on one worker (shared by the tests through a module-scoped fixture), and
once on two workers killed mid-way (a worker, then the driver) and rerun.
"""

import json
import signal
import time
from pathlib import Path

import optuna
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from optuna.trial import TrialState

from fdfa.errors import FdfaError
from hydra_plugins.fdfa_optuna_sweeper import _space as space
from hydra_plugins.fdfa_optuna_sweeper._benchmark import flat_params, read_benchmark
from hydra_plugins.fdfa_optuna_sweeper._liveness import WORKER_ATTR, abandoned
from tests.helpers import REPO
from tests.sweep_helpers import SLOW, finish, meeting_of, sqlite_url, sweep_cli

RULES = ["bp", "dfa", "dkp"]
BENCH = ["benchmark.rules=[bp,dfa,dkp]", "benchmark.trials=3", "benchmark.seeds=2"]
STUDY = "bench"  # hydra.sweeper.study_name: each rule's study is bench-<rule>
# the per-rule sweep file whose params a rule's benchmark space repeats
SWEEP_FILE = {
    "bp": "lr",
    "dfa": "lr",
    "fg_w": "lr",
    "fg_a": "lr",
    **{rule: "lr" for rule in ("fa", "kp", "usf", "brsf", "frsf", "drtp")},  # the lr alone
    "dkp": "dkp",
    "fdfa": "fdfa_adam",
    "fdfa_ema": "fdfa",
}


def compose_benchmark(*overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(
            "config", overrides=["sweep=benchmark", *overrides], return_hydra_config=True
        )


# ------------------------------------------------------------------------- fast


def test_benchmark_spaces_are_the_sweep_files():
    """Each rule's space in sweeps/benchmark.yaml is its own sweep file's (lr, dkp, fdfa_adam,
    fdfa), parses, and names keys of the rule's config."""
    bench = read_benchmark(compose_benchmark())
    parser = OverridesParser.create()
    assert set(bench.rules) == {"bp", "dfa", "dkp", "fdfa", "fg_w", "fg_a"}
    for rule, sweep in SWEEP_FILE.items():
        cfg = compose_benchmark(f"benchmark.rules=[{rule}]")
        spec = read_benchmark(cfg).spaces[rule]
        params = flat_params(spec["params"])
        expected = OmegaConf.load(REPO / "sweeps" / f"{sweep}.yaml").hydra.sweeper.params
        assert params == OmegaConf.to_container(expected), rule
        rule_cfg = compose_benchmark(*spec["overrides"], "~benchmark")
        assert "benchmark" not in rule_cfg
        for key, text in params.items():
            assert OmegaConf.select(rule_cfg, key) is not None, f"{rule}: {key}"
            space.to_distribution(parser.parse_override(f"{key}={text}"))


@pytest.mark.parametrize(
    "override, message",
    [
        ("benchmark.rules=[bp,sgd]", "no space for ['sgd']"),
        ("benchmark.rules=[bp,bp]", "names a rule twice"),
        ("benchmark.trials=0", "benchmark.trials must be an integer >= 1"),
    ],
)
def test_a_bad_benchmark_is_one_line(override, message):
    with pytest.raises(FdfaError, match=message.replace("[", r"\[").replace("]", r"\]")):
        read_benchmark(compose_benchmark(override))


# ------------------------------------------------------------------------- python run.py -m


def bench_cli(sweep_dir: Path, *extra: str, popen: bool = False):
    return sweep_cli(
        sweep_dir,
        *BENCH,
        f"hydra.sweeper.study_name={STUDY}",
        *extra,
        sweep="benchmark",
        popen=popen,
    )


def studies(sweep_dir: Path) -> dict:
    url = sqlite_url(sweep_dir)
    return {r: optuna.load_study(study_name=f"{STUDY}-{r}", storage=url) for r in RULES}


def counted(study) -> list:
    """A study's trials that take one of its places: finished, not handed back."""
    trials = study.get_trials()
    gone = abandoned(trials)
    return [t for t in trials if t.state.is_finished() and t.number not in gone]


def seed_runs(sweep_dir: Path) -> dict[str, list[Path]]:
    """rule -> its finished confirmation runs."""
    runs = {}
    for rule in RULES:
        dirs = sorted((sweep_dir / rule / "confirm").glob("seed*"))
        runs[rule] = [d for d in dirs if status(d) == "completed"]
    return runs


def status(run_dir: Path):
    try:
        return json.loads((run_dir / "summary.json").read_text()).get("status")
    except OSError:
        return None


def check_finished_benchmark(sweep_dir: Path) -> None:
    """Exactly 3 trials per rule (9), 2 seed runs per rule (6) on seeds 1 and 2 (the trials ran
    at 0), and a report with one row per rule carrying its chosen params and trial count."""
    for rule, study in studies(sweep_dir).items():
        trials = counted(study)
        assert len(trials) == 3 and all(t.state != TrialState.FAIL for t in trials), rule
        for t in trials:
            job = OmegaConf.load(sweep_dir / rule / str(t.number) / ".hydra" / "config.yaml")
            assert job.seed == 0 and "benchmark" not in job
            assert job.algorithm._target_.lower().endswith("." + rule)
    runs = seed_runs(sweep_dir)
    assert {r: [d.name for d in runs[r]] for r in RULES} == {r: ["seed1", "seed2"] for r in RULES}
    with (sweep_dir / "report" / "results.csv").open() as f:
        import csv

        rows = {row["algorithm"]: row for row in csv.DictReader(f)}
    assert sorted(rows) == sorted(RULES)
    for rule, study in studies(sweep_dir).items():
        chosen = study.best_params
        assert rows[rule]["trials"] == "3"
        assert rows[rule]["seeds"] == "1 2"
        for key, value in chosen.items():
            assert f"{key}={value:g}" in rows[rule]["chosen_params"], (rule, key)
        for run in runs[rule]:  # the seed runs ran the chosen params
            config = OmegaConf.load(run / ".hydra" / "config.yaml")
            assert OmegaConf.select(config, "optimizer.lr") == pytest.approx(chosen["optimizer.lr"])
    assert rows["bp"]["diff_to_bp_pairs"] == "0"  # BP itself
    assert rows["dfa"]["diff_to_bp_pairs"] == rows["dkp"]["diff_to_bp_pairs"] == "2"
    assert "| chosen params | trials |" in (sweep_dir / "report" / "results.md").read_text()


@pytest.fixture(scope="module")
def finished_benchmark(tmp_path_factory):
    """A 3-rule benchmark, 3 trials and 2 seeds each, on one worker: (sweep dir, output)."""
    sweep_dir = tmp_path_factory.mktemp("benchmark")
    res = bench_cli(sweep_dir)
    assert res.returncode == 0, res.stdout + res.stderr
    return sweep_dir, res.stdout + res.stderr


@pytest.mark.slow
def test_benchmark_runs_every_rule_then_seeds_then_the_report(finished_benchmark):
    sweep_dir, output = finished_benchmark
    check_finished_benchmark(sweep_dir)
    # one progress line per finished trial and seed run, naming the rule
    for rule in RULES:
        assert output.count(f"[{rule}] trial ") == 3, output
        assert output.count(f"[{rule}] seed ") == 2
    assert "trial(s) left" in output and "seed run(s) left" in output
    assert "overall [" not in output  # not on a terminal: no progress bar, the lines alone
    assert f"report: {sweep_dir / 'report' / 'results.md'}" in output


@pytest.mark.slow
def test_benchmark_rerun_recomputes_nothing(finished_benchmark):
    sweep_dir, _ = finished_benchmark
    before = {p: p.stat().st_mtime_ns for p in sweep_dir.glob("*/*/summary.json")}
    before |= {p: p.stat().st_mtime_ns for p in sweep_dir.glob("*/confirm/*/summary.json")}
    res = bench_cli(sweep_dir)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Launching" not in res.stdout + res.stderr  # no job at all
    after = {p: p.stat().st_mtime_ns for p in before}
    assert after == before and len(before) == 9 + 6
    check_finished_benchmark(sweep_dir)


@pytest.mark.slow
def test_benchmark_on_two_workers_killed_midway_resumes_without_redoing(tmp_path):
    """Two workers; once some trials finished, SIGKILL the second worker, then the driver; the
    same command finishes with the same counts, and no finished trial or seed run ran again."""
    sweep_dir = tmp_path / "bench"
    met = meeting_of(2, tmp_path / "met")  # both workers surely run trials before the kill
    driver = bench_cli(sweep_dir, "hydra.sweeper.n_jobs=2", *SLOW, *met, popen=True)
    deadline = time.time() + 300
    while time.time() < deadline and driver.poll() is None:
        try:
            done = sum(len(counted(s)) for s in studies(sweep_dir).values())
        except Exception:  # the studies do not exist yet
            done = 0
        if done >= 4:
            break
        time.sleep(0.2)
    assert driver.poll() is None, finish(driver, 1)
    running = [
        t for s in studies(sweep_dir).values() for t in s.get_trials(states=(TrialState.RUNNING,))
    ]
    pids = {t.user_attrs[WORKER_ATTR]["pid"] for t in running} - {driver.pid}
    import os

    for pid in pids:  # the second worker, mid-trial
        os.kill(pid, signal.SIGKILL)
    driver.send_signal(signal.SIGKILL)
    finish(driver, 30)
    done_before = {
        p: p.stat().st_mtime_ns
        for p in [*sweep_dir.glob("*/*/summary.json"), *sweep_dir.glob("*/confirm/*/summary.json")]
        if status(p.parent) in ("completed", "pruned")
    }
    assert len(done_before) >= 4

    res = bench_cli(sweep_dir, "hydra.sweeper.n_jobs=2", *SLOW, *met)
    assert res.returncode == 0, res.stdout + res.stderr
    check_finished_benchmark(sweep_dir)
    assert {p: p.stat().st_mtime_ns for p in done_before} == done_before  # none ran again
    workers = {
        t.user_attrs[WORKER_ATTR]["pid"] for s in studies(sweep_dir).values() for t in counted(s)
    }
    assert len(workers) >= 3  # the first command's two workers and the rerun's


@pytest.mark.slow
def test_benchmark_through_submitit_local(tmp_path):
    """The benchmark's workers as two submitit_local jobs: the same counts as on one local
    worker, each job ran trials, and the command itself ran none."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install '.[cluster]'")
    sweep_dir = tmp_path / "bench"
    # each job runs a trial before any trial trains (HeldData waits for the meeting)
    met = [SLOW[0], *meeting_of(2, tmp_path / "met")]
    proc = bench_cli(
        sweep_dir, "hydra/launcher=submitit_local", "hydra.sweeper.n_jobs=2", *met, popen=True
    )
    out = finish(proc, 400)
    assert proc.returncode == 0, out
    check_finished_benchmark(sweep_dir)
    workers = {
        t.user_attrs[WORKER_ATTR]["pid"] for s in studies(sweep_dir).values() for t in counted(s)
    }
    assert len(workers) == 2 and proc.pid not in workers
    assert sorted(p.name for p in (sweep_dir / "workers").iterdir()) == ["0", "1"]
    assert f"report: {sweep_dir / 'report' / 'results.md'}" in out
