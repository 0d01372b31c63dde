"""Experiment presets (conf/experiment/) and the offline comparison report (fdfa/report/)."""

import csv
import functools
import json
import os
import shutil
import statistics
import warnings
from pathlib import Path

import matplotlib.image
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from fdfa.report import (
    Row,
    RunData,
    _mean_band,
    group_rows,
    load_run,
    main,
    make_report,
    plot_accuracy,
    plot_layers,
    row_stats,
    unpaired_notes,
)
from fdfa.train import train
from tests.helpers import CONF, NETWORK_PRESETS, compose_config, run_cli, synthetic_overrides

# preset -> (dataset, model class, model keys, batch size): the reference code's runs
PRESETS = {
    "mnist_fc1": ("mnist", "FCNet", {"n_layers": 1, "width": None}, 64),
    "mnist_fc1_fgw_ref": ("mnist", "FCNet", {"n_layers": 1, "width": None, "batchnorm": False}, 64),
    "mnist_fc2": ("mnist", "FCNet", {"n_layers": 2, "width": None}, 64),
    "mnist_fc3": ("mnist", "FCNet", {"n_layers": 3, "width": None}, 64),
    "fashion_mnist_fc2": ("fashion_mnist", "FCNet", {"n_layers": 2}, 64),
    "cifar10_fc2": ("cifar10", "FCNet", {"n_layers": 2}, 64),
    "mnist_cnn": ("mnist", "ShallowCNN", {"pool": [False, True]}, 64),
    "mnist_cnn_paper": ("mnist", "ShallowCNN", {"pool": [True, True]}, 64),
    "cifar10_cnn": ("cifar10", "ShallowCNN", {"pool": [False, True]}, 64),
    "cifar10_cnn_paper": ("cifar10", "ShallowCNN", {"pool": [True, True]}, 64),
    "cifar100_alexnet": ("cifar100", "AlexNet", {"input_size": 224, "fc_width": 4096}, 128),
}
ALGORITHMS = sorted(p.stem for p in (CONF / "algorithm").glob("*.yaml"))
STEPS_2 = "trainer.max_steps=2"  # enough for runs whose numbers a test does not read
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@functools.cache
def without_preset(algorithm):
    return compose_config([f"algorithm={algorithm}"])


def test_every_preset_is_listed_here():
    presets = sorted([*PRESETS, *NETWORK_PRESETS])
    assert sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")) == presets


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes_with_the_reference_hyperparameters(preset):
    lines = (CONF / "experiment" / f"{preset}.yaml").read_text().splitlines()
    assert lines[0] == "# @package _global_"  # Hydra reads "# @" lines only before any other
    assert lines[1].startswith("# python run.py") and f"experiment={preset}" in lines[1]
    dataset, model_class, model_keys, batch_size = PRESETS[preset]
    for algorithm in ALGORITHMS:
        cfg = compose_config([f"experiment={preset}", f"algorithm={algorithm}"])
        # the rule and its optimizer are the algorithm's own (the reference's for BP to FDFA)
        assert cfg.algorithm == without_preset(algorithm).algorithm
        assert cfg.optimizer == without_preset(algorithm).optimizer
        assert cfg.dataset.name == dataset and cfg.model._target_ == f"fdfa.models.{model_class}"
        assert {k: cfg.model[k] for k in model_keys} == model_keys
        assert (cfg.dataset.batch_size, cfg.dataset.test_batch_size) == (batch_size, 1000)
        assert cfg.dataset.augment == ("flip_crop" if dataset == "cifar100" else "none")
        assert cfg.trainer.epochs == 100 and cfg.scheduler.gamma == 0.95
        if algorithm in ("bp", "dfa", "dkp", "fdfa"):
            assert cfg.optimizer._target_ == "torch.optim.Adam" and cfg.optimizer.lr == 1e-4
    # the command line still wins over the preset
    cfg = compose_config([f"experiment={preset}", "dataset=fake", "trainer.epochs=2"])
    assert cfg.dataset._target_ == "fdfa.data.FakeImageData" and cfg.trainer.epochs == 2


def test_compare_sweep_runs_every_rule_with_three_seeds():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["sweep=compare"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    direct = ["bp", "dfa", "dkp", "fdfa", "fg_w", "fg_a"]
    assert params.algorithm.split(",") == [*direct, "fa", "kp", "usf", "brsf", "frsf", "drtp"]
    assert sorted(params.algorithm.split(",")) == ALGORITHMS and params.seed == "0,1,2"


@pytest.mark.slow
def test_experiment_multirun_lands_under_one_sweep_dir(tmp_path):
    res = run_cli(
        ["-m", "experiment=mnist_fc2", "algorithm=bp,dfa", "seed=0,1"]
        + synthetic_overrides("trainer.epochs=1", "model.width=16"),
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    (sweep,) = (tmp_path / "multirun" / "mnist_fc2").iterdir()  # one dir for the whole sweep
    runs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert runs == ["0-bp-seed0", "1-bp-seed1", "2-dfa-seed0", "3-dfa-seed1"]
    for name in runs:
        summary = json.loads((sweep / name / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["model"] == "fc"
        assert f"{summary['algorithm']}-seed{summary['seed']}" == name.split("-", 1)[1]
        assert (sweep / name / "metrics.jsonl").is_file()
        assert (sweep / name / ".hydra" / "config.yaml").is_file()
    # the report reads the sweep dir as it is: 2 rows (bp, dfa) of 2 seeds each
    assert main([str(sweep), "--out", str(tmp_path / "report")]) == 0
    rows = list(csv.DictReader((tmp_path / "report" / "results.csv").open()))
    assert [(r["algorithm"], r["n_runs"], r["seeds"]) for r in rows] == [
        ("bp", "2", "0 1"),
        ("dfa", "2", "0 1"),
    ]


# ---- the report on runs trained here ---------------------------------------------------------

ALIGN_STEPS = [4, 12, 20]  # steps of the alignment records added to the fdfa runs


def train_run(out_dir, algorithm, seed, *extra):
    """A real training run on the synthetic task, with the files a Hydra run has."""
    cfg = compose_config(
        synthetic_overrides(
            f"algorithm={algorithm}", f"seed={seed}", "trainer.epochs=3", "model.width=32", *extra
        )
    )
    train(cfg, out_dir, names={"algorithm": algorithm, "model": "fc", "dataset": "synthetic"})
    (out_dir / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(cfg, out_dir / ".hydra" / "config.yaml")
    return out_dir


def add_alignment_records(run_dir, seed):
    """Per-step records as the alignment metrics write them (values differ per seed and step)."""
    with (run_dir / "metrics.jsonl").open("a") as f:
        for i, step in enumerate(ALIGN_STEPS):
            cos = {"fc1": 0.1 * (i + 1) + 0.01 * seed, "fc2": 0.2 * (i + 1) - 0.02 * seed}
            record = {"step": step, "align/mean_cos": (cos["fc1"] + cos["fc2"]) / 2}
            for layer, c in cos.items():
                record[f"align/{layer}/cos"] = c
                record[f"feedback/{layer}/cos"] = c / 2
                record[f"estimator/{layer}/grad_rel_mse"] = 0.5 / (step + seed)
                record[f"estimator/{layer}/jacobian_rel_mse"] = 10.0 / (step + seed)
            f.write(json.dumps(record) + "\n")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """bp and fdfa x seeds 0, 1 (fdfa in a 'sweep' dir, bp made one by one), plus bad runs."""
    root = tmp_path_factory.mktemp("runs")
    for seed in (0, 1):
        train_run(root / "sweep" / f"fdfa-{seed}", "fdfa", seed)
        add_alignment_records(root / "sweep" / f"fdfa-{seed}", seed)
        train_run(root / "single" / f"bp-{seed}", "bp", seed)
    diverged = root / "sweep" / "fdfa-diverged"
    shutil.copytree(root / "sweep" / "fdfa-0", diverged)
    summary = json.loads((diverged / "summary.json").read_text())
    (diverged / "summary.json").write_text(json.dumps({**summary, "status": "diverged"}))
    (root / "sweep" / "crashed" / ".hydra").mkdir(parents=True)  # died before training
    no_metrics = root / "single" / "no-metrics"
    shutil.copytree(root / "single" / "bp-0", no_metrics)
    (no_metrics / "metrics.jsonl").unlink()
    return root


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return make_report([runs / "sweep", runs / "single"], out), out


def summaries(run_dirs):
    return [json.loads((d / "summary.json").read_text()) for d in run_dirs]


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]


def test_table_numbers_match_the_runs_files(runs, report):
    _, out = report
    table = {r["algorithm"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert sorted(table) == ["bp", "fdfa"]
    md = (out / "results.md").read_text()
    for algorithm, parent in (("bp", "single"), ("fdfa", "sweep")):
        dirs = [runs / parent / f"{algorithm}-{seed}" for seed in (0, 1)]
        row, runs_summaries = table[algorithm], summaries(dirs)
        assert (row["dataset"], row["model"], row["n_runs"], row["seeds"]) == (
            "synthetic",
            "fc",
            "2",
            "0 1",
        )
        for column, key in (
            ("selected_test_acc", "selected/test/acc"),
            ("final_test_acc", "test/acc"),
        ):
            values = [s[key] for s in runs_summaries]
            # two seeds: the 95 % interval is t_{0.975, 1} = 12.7062047 standard errors wide
            mean, half = statistics.fmean(values), 12.7062047 * statistics.stdev(values) / 2**0.5
            assert float(row[f"{column}_mean"]) == pytest.approx(mean, rel=1e-12)
            assert float(row[f"{column}_ci95"]) == pytest.approx(half, rel=1e-7)
            assert f"{100 * mean:.2f} ± {100 * half:.2f}" in md
        best_val = statistics.fmean(s["best/val/acc"] for s in runs_summaries)
        assert float(row["best_val_acc_mean"]) == pytest.approx(best_val, rel=1e-12)
        assert row["epochs"] == "3"
        # s / epoch: the last evaluation's time_s over its epoch (3), mean over seeds
        last_evals = [[r for r in records(d) if "test/acc" in r][-1] for d in dirs]
        per_epoch = statistics.fmean(r["time_s"] / r["epoch"] for r in last_evals)
        assert float(row["time_per_epoch_s"]) == pytest.approx(per_epoch, rel=1e-12)
    # at least one accuracy differs between the seeds, so the interval above was a real check
    assert any(float(table[a]["final_test_acc_ci95"]) > 0 for a in table)
    # FDFA minus BP, paired by seed
    bp, fdfa = (summaries([runs / p / f"{a}-{s}" for s in (0, 1)]) for a, p in PAIRS)
    diffs = [f["selected/test/acc"] - b["selected/test/acc"] for f, b in zip(fdfa, bp)]
    assert table["fdfa"]["diff_to_bp_pairs"] == "2" and table["bp"]["diff_to_bp_pairs"] == "0"
    assert float(table["fdfa"]["diff_to_bp_mean"]) == pytest.approx(statistics.fmean(diffs))
    half = 12.7062047 * statistics.stdev(diffs) / 2**0.5
    assert float(table["fdfa"]["diff_to_bp_ci95"]) == pytest.approx(half, rel=1e-7, abs=1e-12)
    assert "test acc at best-val epoch (%), mean ± 95% CI" in md
    # align cos: the last align/mean_cos of each run, mean over seeds; bp logged none
    last = [[r for r in records(runs / "sweep" / f"fdfa-{s}") if "align/mean_cos" in r][-1]
            for s in (0, 1)]  # fmt: skip
    expected = statistics.fmean(r["align/mean_cos"] for r in last)
    assert float(table["fdfa"]["align_mean_cos"]) == pytest.approx(expected, rel=1e-12)
    assert table["bp"]["align_mean_cos"] == ""


PAIRS = (("bp", "single"), ("fdfa", "sweep"))


def fake_run(algorithm, seed, acc, **config):
    """A finished run in memory: one evaluation (test acc ``acc``) and a flat config."""
    summary = {"status": "completed", "dataset": "synthetic", "model": "fc", "seed": seed}
    config = {"seed": seed, "trainer.epochs": 1, "algorithm._target_": algorithm, **config}
    records = [{"epoch": 1, "step": 10, "test/acc": acc, "time_s": 1.0}]
    return RunData(
        Path(f"/runs/{algorithm}-{seed}"), {**summary, "algorithm": algorithm}, records, config
    )


def test_the_difference_to_bp_pairs_runs_by_seed_not_by_rank():
    """BP has seeds 0, 1, 2, DFA seeds 2 and 1 (listed in that order): DFA minus BP on seeds 1
    and 2, never DFA's first run minus BP's first."""
    bp = [fake_run("bp", s, acc) for s, acc in ((0, 0.5), (1, 0.6), (2, 0.9))]
    dfa = [fake_run("dfa", 2, 0.95), fake_run("dfa", 1, 0.7)]
    rows = group_rows(bp + dfa)
    stats = {s["algorithm"]: s for s in (row_stats(row, rows) for row in rows)}
    diffs = [0.7 - 0.6, 0.95 - 0.9]  # seeds 1 and 2
    assert stats["dfa"]["diff_to_bp_pairs"] == 2
    assert stats["dfa"]["diff_to_bp_mean"] == pytest.approx(statistics.fmean(diffs))
    half = 12.7062047 * statistics.stdev(diffs) / 2**0.5
    assert stats["dfa"]["diff_to_bp_ci95"] == pytest.approx(half, rel=1e-7)


def test_only_runs_of_the_same_settings_are_paired_with_bp():
    """A rule's own options (algorithm.*, FG-W's own lr preset) may differ from BP's; any other
    setting (epochs, another lr for a rule without a preset of its own) leaves Δ empty."""
    bp = [fake_run("bp", s, 0.5 + 0.1 * s, **{"optimizer.lr": 1e-4}) for s in (0, 1)]
    fdfa = [fake_run("fdfa", s, 0.6, **{"optimizer.lr": 1e-4, "algorithm.n": 3}) for s in (0, 1)]
    fg_w = [fake_run("fg_w", s, 0.4, **{"optimizer.lr": 1e-3}) for s in (0, 1)]
    dfa = [fake_run("dfa", s, 0.4, **{"optimizer.lr": 1e-3}) for s in (0, 1)]
    dkp = [fake_run("dkp", s, 0.4, **{"optimizer.lr": 1e-4, "trainer.epochs": 2}) for s in (0, 1)]
    rows = group_rows(bp + fdfa + fg_w + dfa + dkp)
    stats = {s["algorithm"]: s for s in (row_stats(row, rows) for row in rows)}
    assert [stats[a]["diff_to_bp_pairs"] for a in ("fdfa", "fg_w", "dfa", "dkp")] == [2, 2, 0, 0]
    assert stats["fdfa"]["diff_to_bp_mean"] == pytest.approx(0.6 - 0.55)
    assert stats["dfa"]["diff_to_bp_mean"] is None
    assert stats["dfa"]["diff_to_bp_unpaired_why"] == (
        "no BP run with the same settings: BP's differ in optimizer.lr (0.001 here, 0.0001 in BP)"
    )
    assert "trainer.epochs (2 here, 1 in BP)" in stats["dkp"]["diff_to_bp_unpaired_why"]
    assert stats["bp"]["diff_to_bp_unpaired_why"] is None
    notes = unpaired_notes(list(stats.values()))
    assert len(notes) == 2 and notes[0].startswith(
        "Δ vs BP empty for dfa [optimizer.lr=0.001, trainer.epochs=1] ("
    )


def test_a_bp_run_of_other_epochs_is_no_baseline_and_the_report_says_why(runs, tmp_path):
    copy_run(runs / "single" / "bp-0", tmp_path / "runs" / "bp-0")
    train_run(tmp_path / "runs" / "dfa-0", "dfa", 0, "trainer.epochs=2")
    make_report([tmp_path / "runs"], tmp_path / "report")
    (dfa,) = [r for r in csv.DictReader((tmp_path / "report" / "results.csv").open())
              if r["algorithm"] == "dfa"]  # fmt: skip
    assert dfa["diff_to_bp_mean"] == "" and dfa["diff_to_bp_pairs"] == "0"
    md = (tmp_path / "report" / "results.md").read_text()
    assert (
        "- Δ vs BP empty for dfa [trainer.epochs=2] (synthetic / fc): no BP run with the same "
        "settings: "
        "BP's differ in trainer.epochs (2 here, 3 in BP)."
    ) in md


def test_plots_are_valid_pngs(report):
    result, out = report
    names = sorted(p.name for p in result.plots)
    assert names == sorted(
        f"{kind}_synthetic_fc.png"
        for kind in ("acc", "align", "feedback", "grad_error", "jacobian_error")
    )  # the update's error and FDFA's Jacobian estimate's error: two figures, never one
    md = (out / "results.md").read_text()
    for path in result.plots:
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert image.std() > 0  # something is drawn
        assert f"]({path.name})" in md


def test_mean_band_over_seeds_with_missing_points():
    x, mean, std = _mean_band([{1: 0.5, 2: 0.7}, {1: 0.7}])
    assert list(x) == [1, 2]
    assert mean == pytest.approx([0.6, 0.7])
    assert std == pytest.approx([statistics.stdev([0.5, 0.7]), 0.0])


def test_skipped_runs_and_plots_are_reported_with_reasons(runs, report):
    result, out = report
    reasons = {s.what.rsplit("/", 1)[-1]: s.why for s in result.skipped}
    assert "diverged" in reasons["fdfa-diverged"] and "completed" in reasons["fdfa-diverged"]
    assert "3 of 3 epochs done" in reasons["fdfa-diverged"]  # what its records say
    assert reasons["crashed"].startswith("no summary.json, no records: stopped or failed before")
    assert "no metrics.jsonl" in reasons["no-metrics"]
    assert reasons["align_synthetic_fc.png"] == "1 of 2 rows logged no align/<layer>/cos (bp)"
    md = (out / "results.md").read_text()
    assert "## Skipped" in md and "fdfa-diverged" in md and "no summary.json" in md
    assert "### not completed (1)" in md and "### plot missing some rows (4)" in md


def test_cli_prints_what_it_skipped_in_one_line(runs, tmp_path, capsys):
    assert main([str(runs / "single"), "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("2 runs in 1 rows")
    assert printed[1:] == [
        "skipped 5 items: 1 no records, 4 plot not drawn (each with why: end of results.md)"
    ]
    md = (tmp_path / "results.md").read_text()
    assert "no-metrics: no metrics.jsonl" in md
    assert "align_synthetic_fc.png: no run of synthetic / fc logged align/<layer>/cos" in md
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["acc_synthetic_fc.png"]


def test_runs_that_differ_in_config_get_their_own_rows(tmp_path):
    for n_layers in (1, 2):
        train_run(tmp_path / f"fc{n_layers}", "dfa", 0, f"model.n_layers={n_layers}", STEPS_2)
    train_run(tmp_path / "lr", "dfa", 0, "model.n_layers=2", "optimizer.lr=0.001", STEPS_2)
    result = make_report([tmp_path], tmp_path / "report")
    assert [(r.model, r.algorithm, r.variant) for r in result.rows] == [
        ("fc (n_layers=1)", "dfa", "optimizer.lr=0.0001"),
        ("fc (n_layers=2)", "dfa", "optimizer.lr=0.0001"),
        ("fc (n_layers=2)", "dfa", "optimizer.lr=0.001"),
    ]


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda tmp: [str(tmp / "nope")], "error: no such directory: "),
        (lambda tmp: [str(tmp)], "error: no completed run under "),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, capsys, make_args, message):
    (tmp_path / "run" / ".hydra").mkdir(parents=True)
    assert main([*make_args(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and "\n" not in err


def test_out_must_be_a_directory(runs, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main([str(runs / "single"), "--out", str(tmp_path / "file")]) == 2
    assert "is a file; give a directory" in capsys.readouterr().err


# ---- a real folder: a grid, a sweep, a rerun of the same seed, a killed run, a bench run ------


def copy_run(src, dst, config_changes=None, finished_at=None):
    """A copy of a run dir, its .hydra/config.yaml changed as a sweep or rerun would have it."""
    shutil.copytree(src, dst)
    if config_changes:
        cfg = OmegaConf.load(dst / ".hydra" / "config.yaml")
        for key, value in config_changes.items():
            OmegaConf.update(cfg, key, value, force_add=True)
        OmegaConf.save(cfg, dst / ".hydra" / "config.yaml")
    if finished_at is not None:
        os.utime(dst / "summary.json", (finished_at, finished_at))
    return dst


def set_accuracies(run_dir, acc):
    """Every evaluation's test/acc set to acc (to tell which of two runs the report used)."""
    lines = [{**r, "test/acc": acc} if "test/acc" in r else r for r in records(run_dir)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


@pytest.fixture(scope="module")
def mixed(runs, tmp_path_factory):
    """outputs/ and multirun/ as a user's folder has them after a few weeks."""
    root = tmp_path_factory.mktemp("mixed")
    t0 = 1.7e9
    grid = root / "multirun" / "2026-12-01_10-00-00"
    for seed in (0, 1):  # a grid: bp and fdfa x seeds 0, 1
        copy_run(runs / "single" / f"bp-{seed}", grid / f"{seed}-bp-seed{seed}", None, t0)
        copy_run(runs / "sweep" / f"fdfa-{seed}", grid / f"{2 + seed}-fdfa-seed{seed}", None, t0)
    # the grid rerun later for bp seed 0: the same config and seed, another accuracy
    rerun = root / "multirun" / "2026-12-02_09-00-00" / "0-bp-seed0"
    copy_run(runs / "single" / "bp-0", rerun, {"hydra.job.num": 7}, t0 + 3600)
    set_accuracies(rerun, 0.5)
    # an Optuna sweep of fdfa: trial 0 ema (momentum matters), trial 1 adam (momentum ignored)
    study = root / "multirun" / "fdfa-study"
    trials = [
        {"algorithm.feedback_update": "ema", "algorithm.momentum": 0.9},
        {"algorithm.feedback_lr": 3e-4, "algorithm.momentum": 0.95},
    ]
    for n, params in enumerate(trials):
        copy_run(runs / "sweep" / "fdfa-0", study / str(n), {"optuna_trial": n, **params}, t0)
    # a killed run: 2 of its 3 epochs recorded, last.ckpt written, no summary.json
    killed = copy_run(runs / "sweep" / "fdfa-1", root / "outputs" / "fdfa-fc-synthetic" / "k")
    (killed / "summary.json").unlink()
    kept = [r for r in records(killed) if r.get("epoch", 0) <= 2 and "align/mean_cos" not in r]
    # its own run, not a copy of the grid's (an equal record would say it was resumed there)
    kept = [{**r, "time_s": r["time_s"] + 1} if "time_s" in r else r for r in kept]
    (killed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    # the benchmark's epoch run (fdfa.bench before it moved them): no .hydra, model "fcnet"
    bench = copy_run(runs / "sweep" / "fdfa-0", root / "outputs" / "bench" / "fdfa")
    shutil.rmtree(bench / ".hydra")
    summary = json.loads((bench / "summary.json").read_text())
    (bench / "summary.json").write_text(json.dumps({**summary, "model": "fcnet"}))
    return root


@pytest.fixture(scope="module")
def mixed_report(mixed, tmp_path_factory):
    out = tmp_path_factory.mktemp("mixed_report")
    return make_report([mixed / "outputs", mixed / "multirun"], out), out


def test_mixed_folder_rows_and_labels(runs, mixed, mixed_report):
    result, out = mixed_report
    table = [
        (r["model"], r["algorithm"], r["variant"], r["seeds"])
        for r in csv.DictReader((out / "results.csv").open())
    ]
    assert table == [  # labels: only keys that differ and matter for that rule; no bench row
        ("fc", "bp", "", "0 1"),  # the rerun of seed 0 counted once
        ("fc", "fdfa (feedback_lr=0.0001, feedback_update=adam)", "", "0 1"),
        ("fc", "fdfa (feedback_lr=0.0003, feedback_update=adam)", "", "0"),
        ("fc", "fdfa (feedback_update=ema, momentum=0.9)", "", "0"),
    ]
    md = (out / "results.md").read_text()
    assert "optuna_trial" not in md and "fcnet" not in md
    # the later run of bp seed 0 is the one counted (its accuracy is 0.5 at every epoch)
    bp = next(r for r in csv.DictReader((out / "results.csv").open()) if r["algorithm"] == "bp")
    bp1 = summaries([runs / "single" / "bp-1"])[0]["selected/test/acc"]
    assert float(bp["selected_test_acc_mean"]) == pytest.approx((0.5 + bp1) / 2)
    assert "2026-12-02_09-00-00/0-bp-seed0" in bp["run_dirs"]
    assert any("repeat the config and seed" in n for n in result.notes)


def test_mixed_folder_says_why_each_run_was_left_out(mixed, mixed_report):
    result, out = mixed_report
    skipped = {s.what.split(str(mixed) + "/")[-1]: s for s in result.skipped}
    rerun = skipped["multirun/2026-12-01_10-00-00/0-bp-seed0"]
    assert rerun.kind == "rerun of the same seed"
    assert rerun.why.startswith("same config and seed 0 as ") and "2026-12-02_09-00-00" in rerun.why
    killed = skipped["outputs/fdfa-fc-synthetic/k"]
    assert killed.kind == "interrupted or running"
    assert killed.why.startswith(
        "no summary.json: interrupted or still running, 2 of 3 epochs done (last record: epoch 2,"
    )
    assert "last.ckpt present; rerun with hydra.run.dir=<this dir> to resume" in killed.why
    assert skipped["outputs/bench/fdfa"].kind == "benchmark run"
    kinds = ["rerun of the same seed", "interrupted or running", "benchmark run"]
    assert {s.kind for s in result.skipped} == {*kinds, "plot missing some rows"}
    assert all(len(s.why) < 200 for s in result.skipped)


def test_mixed_folder_cli_output_is_short(mixed, tmp_path, capsys):
    assert main([str(mixed / "outputs"), str(mixed / "multirun"), "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2 and all(len(line) < 300 for line in printed)
    assert printed[1].startswith("skipped 7 items: ")
    assert "1 rerun of the same seed" in printed[1] and "1 benchmark run" in printed[1]


def test_accuracy_legend_never_eats_the_plot(runs, tmp_path):
    """Many rows with long labels: the legend goes below, the axes keep their size."""
    run = load_run(runs / "single" / "bp-0")
    long = ", ".join(f"dataset.some_long_key_{i}=value_{i}" for i in range(6))
    rows = [Row("synthetic", "fc", f"rule{i}", long, [run]) for i in range(25)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "axes sizes collapsed to zero" is a UserWarning
        fig = plot_accuracy(rows, "synthetic / fc", tmp_path / "acc.png")
    (ax,) = fig.axes
    box, legend = ax.get_window_extent(), fig.legends[0].get_window_extent()
    assert box.height / fig.dpi >= 2.5 and box.width / fig.dpi >= 4.5  # inches
    assert legend.y1 <= box.y0  # below the axes
    assert ax.get_legend() is None


def test_single_experiment_plots_have_plain_ticks(runs, tmp_path):
    """BP's cosine is 1 to 1e-12: no offset label; one epoch: integer ticks only."""
    flat, close = load_run(runs / "single" / "bp-0"), load_run(runs / "single" / "bp-0")
    for run, slope in ((flat, 1e-13), (close, 1e-6)):  # BP's 1 to 1e-12; near 1: an offset's case
        run.records = [r for r in run.records if r["epoch"] == 1]
        run.records += [{"step": s, "align/fc1/cos": 1 - slope * s} for s in (10, 20, 30)]
    rows = [Row("synthetic", "fc", name, "", [run]) for name, run in (("bp", flat), ("x", close))]
    fig = plot_layers(rows, "align/{}/cos", "align", "cos", tmp_path / "align.png")
    fig.canvas.draw()
    for ax, widened in zip(fig.axes, (True, False)):  # a flat curve gets a span around it
        assert ax.yaxis.get_major_formatter().get_offset() == ""
        assert (ax.get_ylim()[1] - ax.get_ylim()[0] > 0.05) == widened
    fig = plot_accuracy(rows, "synthetic / fc", tmp_path / "acc.png")
    lo, hi = fig.axes[0].get_xlim()
    ticks = [t for t in fig.axes[0].get_xticks() if lo <= t <= hi]
    assert ticks == [1.0]


# ---- bad run dirs: each skipped with its reason, the rest reported ---------------------------


def _write(name, content):
    def corrupt(run_dir):
        path = run_dir / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)

    return corrupt


def _edit_summary(**changes):
    def corrupt(run_dir):
        summary = json.loads((run_dir / "summary.json").read_text())
        (run_dir / "summary.json").write_text(json.dumps({**summary, **changes}))

    return corrupt


def _edit_first_evaluation(**changes):
    def corrupt(run_dir):
        rows = records(run_dir)
        first = next(i for i, r in enumerate(rows) if "test/acc" in r)
        rows[first] = {**rows[first], **changes}
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    return corrupt


def _append_bytes(run_dir):
    with (run_dir / "metrics.jsonl").open("ab") as f:
        f.write(b'{"epoch": 4, "test/acc": 0.5}\n\xff\xfe\x00binary\n')


@pytest.mark.parametrize(
    "corrupt, reason",
    [
        (_append_bytes, "metrics.jsonl is not text (a bad byte at offset "),
        (_write("summary.json", "null"), "summary.json is not a JSON object (it is NoneType)"),
        (_write("summary.json", "[1, 2]"), "summary.json is not a JSON object (it is list)"),
        (_edit_first_evaluation(epoch=0), "metrics.jsonl line 1: epoch must be an integer >= 1"),
        (_edit_summary(seed="zero"), "seed must be an integer, got 'zero'"),
        (_edit_summary(model=["fc"]), "summary.json's model must be text"),
        (
            _edit_first_evaluation(**{"test/acc": "97%"}),
            "metrics.jsonl line 1: test/acc must be a fraction",
        ),
        (_write(".hydra/config.yaml", b"seed: \xff\n"), ".hydra/config.yaml is not text"),
    ],
)
def test_a_bad_run_dir_is_skipped_with_its_reason(runs, tmp_path, corrupt, reason):
    good = copy_run(runs / "single" / "bp-1", tmp_path / "runs" / "good")
    bad = copy_run(runs / "single" / "bp-0", tmp_path / "runs" / "bad")
    corrupt(bad)
    result = make_report([tmp_path / "runs"], tmp_path / "report")
    assert [[r.path for r in row.runs] for row in result.rows] == [[good.resolve()]]
    (skip,) = [s for s in result.skipped if s.what.endswith("bad")]
    assert skip.why.startswith(reason) and skip.kind == "unreadable"


@pytest.mark.parametrize("status", [None, "interrupted"])
def test_killed_run_says_what_its_records_and_checkpoint_hold(runs, tmp_path, status):
    run_dir = copy_run(runs / "sweep" / "fdfa-0", tmp_path / "runs" / "killed")
    if status is None:
        (run_dir / "summary.json").unlink()
    else:
        _edit_summary(status=status)(run_dir)
    (run_dir / "last.ckpt").unlink()
    result = make_report([runs / "single", tmp_path / "runs"], tmp_path / "report")
    (skip,) = [s for s in result.skipped if s.what.endswith("killed")]
    expected = "no summary.json: interrupted or still running" if status is None else "interrupted"
    assert skip.why == (  # the last record is an alignment record of step 20 (ALIGN_STEPS)
        f"{expected}, 3 of 3 epochs done (last record: step 20); last.ckpt absent"
    )
    assert "failed before training" not in (tmp_path / "report" / "results.md").read_text()


def test_a_run_resumed_elsewhere_is_listed_as_resumed_not_interrupted(tmp_path):
    """trainer.resume=latest continues a killed run in a new run dir: the killed one is listed
    as resumed there (and counted once, there), not as interrupted."""
    killed = train_run(tmp_path / "runs" / "1-killed", "dfa", 0, "trainer.epochs=1")
    (killed / "summary.json").unlink()  # as a killed run leaves it
    train_run(tmp_path / "runs" / "2-rerun", "dfa", 0, "trainer.epochs=2", "trainer.resume=latest")
    result = make_report([tmp_path / "runs"], tmp_path / "report")
    (skip,) = result.skipped[:1]
    assert skip.what.endswith("1-killed") and skip.kind == "resumed elsewhere"
    assert skip.why.startswith("interrupted, then resumed and finished in ")
    assert skip.why.endswith("2-rerun (trainer.resume=latest): counted there")
    assert [r.path.name for row in result.rows for r in row.runs] == ["2-rerun"]
    # a killed run that nothing resumed stays interrupted
    other = train_run(tmp_path / "more" / "killed", "dfa", 1, "trainer.epochs=1")
    (other / "summary.json").unlink()
    result = make_report([tmp_path / "runs", tmp_path / "more"], tmp_path / "report2")
    kinds = {s.what.rsplit("/", 1)[-1]: s.kind for s in result.skipped}
    assert kinds["killed"] == "interrupted or running" and kinds["1-killed"] == "resumed elsewhere"


def test_a_run_moved_aside_by_a_fresh_start_is_listed_not_counted(tmp_path):
    """A fresh start (trainer.resume=never) in a dir that holds a finished run moves that run to
    previous-1/: the report lists it as moved aside and counts only the new run."""
    run_dir = train_run(tmp_path / "runs" / "r", "dfa", 0, "trainer.epochs=1")
    train_run(run_dir, "dfa", 0, "trainer.epochs=2", "trainer.resume=never")
    assert (run_dir / "previous-1" / "summary.json").is_file()
    result = make_report([tmp_path / "runs"], tmp_path / "report")
    runs_left_out = [s for s in result.skipped if s.kind != "plot not drawn"]
    assert [(s.what.rsplit("/", 1)[-1], s.kind) for s in runs_left_out] == [
        ("previous-1", "moved aside")
    ]
    (row,) = result.rows
    assert [r.path for r in row.runs] == [run_dir.resolve()] and row.runs[0].summary["epochs"] == 2


def test_each_rule_keeps_one_colour_in_every_plot_and_variants_differ_in_line(runs, tmp_path):
    """15 rows: no two rules share a colour (tab10 would repeat after 10 rows), a rule has the
    same colour in a plot of other rows, and rows of one rule differ in line style or marker."""
    run = load_run(runs / "single" / "bp-0")
    names = ["bp", "dfa", "dkp", "fdfa", "fg_w", "fg_a", "mine"]
    rows = [Row("synthetic", "fc", n, f"v={i}", [run]) for i in range(2) for n in names]
    rows.append(Row("synthetic", "fc", "dfa", "v=2", [run]))
    for row in rows:
        row.runs = [load_run(runs / "single" / "bp-0")]
        row.runs[0].summary = {**row.runs[0].summary, "algorithm": row.algorithm}
    fig = plot_accuracy(rows, "synthetic / fc", tmp_path / "acc.png")
    colours = {}
    for row, line in zip(rows, fig.axes[0].get_lines()):
        colours.setdefault(row.algorithm, set()).add(line.get_color())
    assert all(len(c) == 1 for c in colours.values())  # one colour per rule
    assert len({c for cs in colours.values() for c in cs}) == len(names)  # all different
    styles = [(line.get_linestyle(), line.get_marker()) for line in fig.axes[0].get_lines()]
    dfa = [s for row, s in zip(rows, styles) if row.algorithm == "dfa"]
    assert len(set(dfa)) == 3
    fewer = plot_accuracy(rows[3:5], "synthetic / fc", tmp_path / "acc2.png")
    assert [line.get_color() for line in fewer.axes[0].get_lines()] == [
        next(iter(colours[r.algorithm])) for r in rows[3:5]
    ]


def test_titles_fit_their_figure_and_log_ticks_are_plain_numbers(runs, tmp_path):
    run = load_run(runs / "single" / "bp-0")
    run.records = [{"step": s, "estimator/fc1/jacobian_rel_mse": 0.99 - 1e-3 * s} for s in (1, 9)]
    label = "dataset.subset=20, dataset.val_size=128, optimizer.lr=0.0001, trainer.epochs=2"
    rows = [Row("synthetic", "fc", "fdfa", label, [run])]
    long = "fake / fc (n_layers=2): FDFA's Jacobian estimate Ĵ vs the true Jacobian J"
    fig = plot_layers(rows, "estimator/{}/jacobian_rel_mse", long, "err", tmp_path / "j.png", True)
    fig.draw_without_rendering()
    (ax,) = fig.axes
    for text in (fig._suptitle, ax.title):
        box = text.get_window_extent()
        assert box.x0 >= 0 and box.x1 <= fig.bbox.width  # nothing clipped
    labels = [t.get_text() for t in ax.get_yticklabels(minor=True) + ax.get_yticklabels()]
    labels = [t for t in labels if t]
    assert labels and len(set(labels)) == len(labels)  # neighbouring ticks told apart
    assert all("10^" not in t and "times" not in t and "e" not in t for t in labels)
