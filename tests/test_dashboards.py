"""What the dashboards show, read back through the real components.

Two CLI runs on the tiny synthetic task feed every test here (module fixtures): a grid of rules
(``-m sweep=compare algorithm=bp,dfa,fdfa``) and an Optuna study (``-m sweep=lr``, four queued
trials: two good, one pruned, one diverged), both with ``logger=all`` (csv, tensorboard, wandb
offline). The W&B tests read the offline run files; a TensorBoard and an optuna-dashboard server,
started here on 127.0.0.1, are asked through their HTTP APIs; headless Chromium renders their
pages. Set FDFA_SCREENSHOT_DIR=docs to refresh README's screenshots.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests.helpers import REPO, synthetic_overrides
from tests.wandb_records import find_run_files, read_run

pytestmark = pytest.mark.slow

STUDY = "rules-fc-fake"
RULES = ("bp", "dfa", "fdfa")
TINY = [o for o in synthetic_overrides("model.width=32", "logger=all") if o != "logger=none"]


def cli(args: list[str], home: Path) -> None:
    """``python run.py ARGS`` as a user would start it: W&B offline, its own wandb service."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "FDFA_WANDB"))}
    env.update(PYTHONPATH=str(REPO), WANDB_MODE="offline", WANDB_SILENT="true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        env[var] = str(home)
    res = subprocess.run(
        [sys.executable, str(REPO / "run.py"), *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dash")
    sweep_dir = root / "compare"
    cli(
        ["-m", "sweep=compare", *TINY, f"algorithm={','.join(RULES)}", "seed=0",
         "trainer.epochs=3", "metrics.every_n_steps=4", f"hydra.sweep.dir={sweep_dir}"],
        root / "home",
    )  # fmt: skip
    return sweep_dir


# queued trials of the study over rules and lrs: three good, one pruned, one diverged
TRIALS = [("bp", 1e-2), ("dfa", 1e-2), ("fdfa", 1e-2), ("fdfa", 1e-7), ("dfa", 1e20)]


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dash")
    sweep_dir = root / STUDY
    sweep_dir.mkdir()
    queued = optuna.create_study(
        study_name=STUDY, storage=f"sqlite:///{sweep_dir / 'optuna.db'}", direction="maximize"
    )
    for rule, lr in TRIALS:
        queued.enqueue_trial({"algorithm": rule, "optimizer.lr": lr})
    cli(
        ["-m", "sweep=lr", *TINY, f"algorithm=choice({','.join(RULES)})", "trainer.epochs=2",
         f"hydra.sweeper.n_trials={len(TRIALS)}", f"hydra.sweeper.study_name={STUDY}",
         "hydra/sweeper/pruner=median", "hydra.sweeper.pruner.n_startup_trials=2",
         "optimizer.lr=tag(log,interval(1e-8,1e21))", f"hydra.sweep.dir={sweep_dir}"],
        root / "home",
    )  # fmt: skip
    return sweep_dir


def runs_by_name(root: Path) -> dict:
    runs = {}
    for path in find_run_files(root):
        run = read_run(path)
        runs[run.name] = run
    return runs


# ----------------------------------------------------------------------------------- W&B


def test_wandb_runs_of_a_grid_share_a_group_with_readable_names_and_epoch_axes(grid):
    runs = runs_by_name(grid)
    assert set(runs) == {f"{rule}-fc-fake-seed0" for rule in RULES}
    assert {r.group for r in runs.values()} == {grid.name}  # the sweep dir's name
    for run in runs.values():
        assert run.job_type == "train" and run.exit_code == 0
        assert run.step_metrics["test/*"] == run.step_metrics["train/*"] == "epoch"
        assert run.step_metrics["align/*"] == "step"
        evaluations = [h for h in run.history if "test/acc" in h]
        assert [h["epoch"] for h in evaluations] == [1, 2, 3]
        assert all(h["step"] == h["_step"] for h in run.history)


def test_wandb_runs_of_a_study_are_trials_and_one_study_run_sums_it_up(study):
    trials = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{study / 'optuna.db'}").trials
    states = [t.state for t in trials]
    assert states == [TrialState.COMPLETE] * 3 + [TrialState.PRUNED, TrialState.FAIL]
    runs = runs_by_name(study)
    by_trial = {
        t.number: runs[f"{t.params['algorithm']}-fc-fake-seed0-trial{t.number}"] for t in trials
    }
    assert {r.group for r in runs.values()} == {STUDY}
    assert {r.job_type for r in by_trial.values()} == {"trial"}
    statuses = [(r.summary["status"], r.exit_code) for r in by_trial.values()]
    assert statuses == [("completed", 0)] * 3 + [("pruned", 0), ("diverged", 0)]

    report = runs[f"study-{STUDY}"]
    best = max((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    assert report.job_type == "study" and report.exit_code == 0
    assert report.summary["best/val/acc"] == best.value  # the objective: val/acc
    assert report.summary["best/trial"] == best.number
    assert report.summary["best/params/optimizer.lr"] == best.params["optimizer.lr"]
    files = next(p.parent for p in find_run_files(study / "wandb")) / "files"
    table = json.loads(next(files.rglob("trials_*.table.json")).read_text())
    assert table["columns"] == ["number", "state", "value", "algorithm", "optimizer.lr"]
    assert [row[:2] for row in table["data"]] == [[t.number, t.state.name.lower()] for t in trials]
    assert [row[3] for row in table["data"]] == [rule for rule, _ in TRIALS]
    images = {p.name.split("_")[0] for p in files.rglob("*.png")}
    assert {"optimization", "parallel"} <= images, images


# ------------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, data: dict | None = None, timeout: float = 10.0):
    body = None if data is None else json.dumps(data).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def serve(cmd: list[str], url: str, ready, log: Path, timeout_s: float = 90.0):
    """Start ``cmd``; once ``ready(get(url))`` holds (bounded wait), yield the server's base URL;
    stop it afterwards."""
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if ready(get(url)):
                    break
            except (OSError, ValueError):
                pass  # not listening yet, or still loading
            assert time.monotonic() < deadline, f"{url} not ready: {log.read_text()[-3000:]}"
            time.sleep(0.5)
        yield "/".join(url.split("/")[:3])  # http://127.0.0.1:<port>
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def tensorboard(grid):
    port = free_port()
    cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", str(grid),
           "--host", "127.0.0.1", "--port", str(port), "--reload_interval", "1"]  # fmt: skip
    ready = lambda runs: len(runs) == len(RULES)  # noqa: E731
    yield from serve(cmd, f"http://127.0.0.1:{port}/data/runs", ready, grid / "tensorboard.log")


@pytest.fixture(scope="module")
def optuna_dashboard(study):
    port = free_port()
    # pip's script, next to python (or on PATH: a venv that takes it from the system's packages)
    dashboard = Path(sys.executable).with_name("optuna-dashboard")
    dashboard = dashboard if dashboard.exists() else shutil.which("optuna-dashboard")
    cmd = [str(dashboard), f"sqlite:///{study / 'optuna.db'}",
           "--host", "127.0.0.1", "--port", str(port), "--quiet"]  # fmt: skip
    ready = lambda studies: bool(studies["study_summaries"])  # noqa: E731
    yield from serve(cmd, f"http://127.0.0.1:{port}/api/studies", ready, study / "dashboard.log")


def test_tensorboard_serves_every_runs_scalars_and_hparams(grid, tensorboard):
    assert sorted(get(f"{tensorboard}/data/runs")) == [f"{rule}-seed0" for rule in RULES]
    for rule in RULES:
        run = f"{rule}-seed0"
        records = [json.loads(line) for line in (grid / run / "metrics.jsonl").open()]
        acc = get(f"{tensorboard}/data/plugin/scalars/scalars?run={run}&tag=test/acc")
        assert [(step, value) for _, step, value in acc] == [
            (r["step"], pytest.approx(r["test/acc"])) for r in records if "test/acc" in r
        ]
        cos = get(f"{tensorboard}/data/plugin/scalars/scalars?run={run}&tag=align/mean_cos")
        assert [step for _, step, _ in cos] == [r["step"] for r in records if "align/mean_cos" in r]

    request = {
        "experimentName": "",
        "allowedStatuses": ["STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING", "STATUS_UNKNOWN"],
        "colParams": [],
        "startIndex": 0,
        "sliceSize": 100,
    }
    groups = get(f"{tensorboard}/data/plugin/hparams/session_groups", request)["sessionGroups"]
    assert sorted(g["name"] for g in groups) == [f"{rule}-fc-fake-seed0" for rule in RULES]
    for group in groups:
        (session,) = group["sessions"]
        summary = json.loads((grid / session["name"] / "summary.json").read_text())
        assert group["hparams"]["algorithm"] == summary["algorithm"]
        assert group["hparams"]["lr"] == 1e-4 and group["hparams"]["seed"] == 0
        assert session["status"] == "STATUS_SUCCESS"
        metrics = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
        assert metrics["best/test/acc"] == pytest.approx(summary["best/test/acc"])
        assert metrics["test/acc"] == pytest.approx(summary["test/acc"])
    experiment = get(f"{tensorboard}/data/plugin/hparams/experiment", {"experimentName": ""})
    algorithm = next(h for h in experiment["hparamInfos"] if h["name"] == "algorithm")
    assert sorted(algorithm["domainDiscrete"]) == sorted(RULES)


def test_optuna_dashboard_lists_the_study(study, optuna_dashboard):
    (summary,) = get(f"{optuna_dashboard}/api/studies")["study_summaries"]
    assert summary["study_name"] == STUDY and summary["directions"] == ["maximize"]
    detail = get(f"{optuna_dashboard}/api/studies/{summary['study_id']}")
    states = [t["state"] for t in detail["trials"]]
    assert states == ["Complete"] * 3 + ["Pruned", "Fail"], states
    assert [t["params"][0]["param_external_value"] for t in detail["trials"]] == [
        rule for rule, _ in TRIALS
    ]


# ------------------------------------------------------------------------------- browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def browse(url: str, *args: str) -> str:
    """Headless Chromium on ``url``: the rendered DOM (``--dump-dom``) or a ``--screenshot``."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-3d-apis",
           "--disable-dev-shm-usage", "--hide-scrollbars", "--virtual-time-budget=15000",
           *args, url]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def screenshot(url: str, path: Path, size: str = "1400,800") -> None:
    browse(url, f"--window-size={size}", f"--screenshot={path}")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, path  # not a blank page


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)")
def test_a_browser_renders_both_dashboards(tensorboard, optuna_dashboard, tmp_path):
    dom = browse(f"{tensorboard}/#timeseries", "--dump-dom")
    for rule in RULES:
        assert f"> {rule}-seed0 <" in dom, f"run {rule}-seed0 not rendered"
    dom = browse(f"{optuna_dashboard}/dashboard", "--dump-dom")
    assert STUDY in dom

    out = Path(os.environ.get("FDFA_SCREENSHOT_DIR") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    screenshot(f"{tensorboard}/#scalars&tagFilter=test%2Facc%7Cmean_cos&_smoothingWeight=0",
               out / "tensorboard_scalars.png")  # fmt: skip
    screenshot(f"{tensorboard}/#hparams", out / "tensorboard_hparams.png", "1400,600")
    screenshot(f"{optuna_dashboard}/dashboard/studies/1/analytics", out / "optuna_dashboard.png")
