"""A mistyped key is refused in one line with the closest valid key, ``+`` or not; a class of the
user's own (its ``_target_`` set) takes any key."""

import pytest

from fdfa.errors import FdfaError
from fdfa.validate import preflight
from tests.helpers import run_cli, synthetic_overrides


@pytest.mark.parametrize(
    "args, message",
    [
        (["trainer.epoch=1"], "unknown key trainer.epoch: did you mean trainer.epochs?"),
        (["+trainer.epoch=1"], "unknown key trainer.epoch: did you mean trainer.epochs?"),
        (["++trainer.epoch=1"], "unknown key trainer.epoch: did you mean trainer.epochs?"),
        (["+trainr.epochs=3"], "unknown key trainr.epochs: did you mean trainer.epochs?"),
        (["-m", "algorithm=fdfa", "algorithm.feedback_updte=ema,adam"],
         "unknown key algorithm.feedback_updte: did you mean algorithm.feedback_update?"),
        (["+seeed=1"], "unknown key seeed: did you mean seed?"),
        (["algorithm=dkp", "+algorithm.momentum=0.9"],
         "unknown key algorithm.momentum: the keys of algorithm are feedback_decay, feedback_lr"),
        (["algorithm=bp", "++algorithm.momentum=0.9"],
         "unknown key algorithm.momentum: algorithm has no keys to set"),
        (["experiment=cifar100_alexnet", "+model.fc_widht=10"],
         "unknown key model.fc_widht: did you mean model.fc_width?"),  # the preset's keys
    ],
)  # fmt: skip
def test_unknown_key_is_refused_with_the_closest_one(args, message):
    with pytest.raises(FdfaError) as err:
        preflight(args)
    assert str(err.value).startswith(message)


@pytest.mark.parametrize(
    "args",
    [
        ["trainer.epochs=1", "optimizer.lr=3e-4", "seed=0,1", "-m"],
        ["experiment=cifar100_alexnet", "model.fc_width=10", "metrics.jacobian_metrics=true"],
        ["sweep=fdfa", "hydra.sweeper.n_trials=3", "optimizer.lr=1e-3", "hydra/sweeper=basic"],
        ["~model", "+model._target_=tests.helpers.TinyUserNet", "+model.hidden=8"],  # user's class
        synthetic_overrides("+dataset.noise=2.5"),  # dataset._target_ is the tests' class
        ["+logger.mine._target_=mypkg.Logger", "+logger.mine.depth=1", "logger.csv.filename=m"],
        ["algorithm=bp,fdfa", "algorithm.momentum=0.9", "--multirun"],  # fdfa has it
    ],
)
def test_valid_and_user_plugged_keys_pass(args):
    preflight(args)


@pytest.mark.slow
def test_cli_refuses_a_typo_in_one_line_before_any_work(tmp_path):
    res = run_cli(["+trainer.epoch=1", f"hydra.run.dir={tmp_path / 'run'}"])
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [
        "error: unknown key trainer.epoch: did you mean trainer.epochs? "
        "(python run.py --cfg job lists all)"
    ]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
