"""Bad input: one clear line naming the problem, exit code != 0, no traceback, no fake result."""

import pytest

from fdfa.errors import FdfaError
from fdfa.train import Run
from fdfa.validate import preflight
from tests.helpers import compose_config, run_cli, synthetic_overrides


def one_error_line(res):
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    "override, expected",
    [
        ("optimizer.lr=abc", "optimizer.lr must be a finite number > 0, got 'abc'"),
        ("algorithm.momentum=1.0", "algorithm.momentum must be a number in [0, 1), got 1.0"),
        ("model=cnn", "model=cnn cannot take (1, 8, 8) inputs"),  # the model vs the dataset
    ],
)
def test_cli_bad_values(tmp_path, override, expected):
    res = run_cli([*synthetic_overrides(override), f"hydra.run.dir={tmp_path}"])
    assert expected in one_error_line(res)
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.slow
def test_cli_unknown_group_option_lists_the_valid_ones(tmp_path):
    res = run_cli(["algorithm=bpp", f"hydra.run.dir={tmp_path}"])
    line = one_error_line(res)
    assert "unknown algorithm 'bpp': choose one of bp, brsf, dfa, dkp, drtp, fa, fdfa" in line


@pytest.mark.slow
def test_cli_unwritable_run_dir(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    line = one_error_line(run_cli([f"hydra.run.dir={blocker / 'run'}"]))
    assert f"hydra.run.dir {blocker / 'run'} is not a writable folder" in line


@pytest.mark.slow
def test_cli_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"\x00not a checkpoint")
    res = run_cli(
        [*synthetic_overrides(f"trainer.resume={bad}"), f"hydra.run.dir={tmp_path / 'r'}"]
    )
    assert f"checkpoint {bad} is corrupt or unreadable" in one_error_line(res)


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimizer.lr=0", "optimizer.lr must be a finite number > 0, got 0"),
        ("optimizer.lr=-1e-3", "optimizer.lr must be a finite number > 0"),
        ("algorithm.momentum=-0.1", "algorithm.momentum must be a number in [0, 1)"),
        ("dataset.batch_size=0", "dataset.batch_size must be an integer >= 2 (BatchNorm needs 2"),
        ("dataset.batch_size=1.5", "dataset.batch_size must be an integer >= 2 (BatchNorm"),
        ("trainer.epochs=0", "trainer.epochs must be an integer >= 1, got 0"),
        ("trainer.device=tpu", "trainer.device must be auto, cpu or cuda"),
        ("trainer.cuda_graph=maybe", "trainer.cuda_graph must be true or false"),
        ("algorithm.feedback_update=sgd", "algorithm.feedback_update must be adam or ema"),
        ("dataset.augment=yes", "dataset.augment must be none or flip_crop"),
        ("trainer.resume=/no/such.ckpt", "trainer.resume=/no/such.ckpt: no such checkpoint file"),
        # values that used to pass validation, then crash
        ("seed=-1", "seed must be an integer in [0, 4294967295], got -1"),
        ("seed=4294967296", "seed must be an integer in [0, 4294967295], got 4294967296"),
        ("dataset.batch_size=1", "dataset.batch_size must be an integer >= 2 (BatchNorm needs 2"),
        ("algorithm.feedback_lr=inf", "algorithm.feedback_lr must be a finite number > 0, got inf"),
        ("optimizer.lr=nan", "optimizer.lr must be a finite number > 0, got nan"),
        ("scheduler.gamma=inf", "scheduler.gamma must be a finite number > 0, got inf"),
    ],
)
def test_bad_values_in_process(tmp_path, override, message):
    with pytest.raises(FdfaError) as err:
        Run(compose_config(synthetic_overrides("algorithm=fdfa", override)), tmp_path).setup()
    assert message in str(err.value)
    assert not (tmp_path / "summary.json").exists()


def test_preflight_accepts_valid_and_sweep_syntax(tmp_path):
    preflight(["algorithm=bp,dfa", "model=cnn", "logger=[csv,none]", "seed=1,2"])
    preflight(["algorithm=choice(bp,fdfa)", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    with pytest.raises(FdfaError, match="unknown dataset 'mnistt'"):
        preflight(["dataset=mnist,mnistt"])
