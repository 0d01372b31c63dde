"""Checks at the boundary: each rule, model and dataset checks its own arguments in plain Python
(fdfa/checks.py) and names the argument; the config layer (fdfa/validate.py) applies the same
checks to a composed config and names the key; the torch side imports nothing of the config
layer; a mistyped sweeper key is refused like any other key."""

import subprocess
import sys

import pytest

from fdfa.checks import ArgumentError, check_arguments, integer
from fdfa.data import TensorData
from fdfa.errors import FdfaError
from fdfa.models import AlexNet, BlockNet, FCNet
from fdfa.rules import DKP, FDFA, FGA, FGW
from fdfa.rules.base import DirectFeedbackRule
from fdfa.validate import preflight, validate_config
from tests.helpers import REPO, compose_config, run_cli

CONFIG_LAYER = ("hydra", "omegaconf", "optuna", "wandb", "hydra_plugins", "fdfa.validate")


def test_rules_models_data_and_tangents_import_no_config_layer():
    code = (
        "import sys, fdfa.rules, fdfa.models, fdfa.data, fdfa.tangents, fdfa.checks\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {CONFIG_LAYER!r}"
        f" or m in {CONFIG_LAYER!r}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout


def fc():
    return FCNet((1, 4, 4), 3, n_layers=1, width=8)


def tensor_data(**kwargs):
    import torch

    x, y = torch.zeros(8, 1, 4, 4, dtype=torch.uint8), torch.zeros(8, dtype=torch.long)
    return TensorData(x, y, x, y, 3, **kwargs)


@pytest.mark.parametrize(
    "build, kind, message",
    [
        (lambda: FCNet((1, 4, 4), 3, n_layers=0), ValueError,
         "n_layers must be an integer >= 1, got 0"),
        (lambda: FCNet((1, 4, 4), 3, width=2.5), TypeError,
         "width must be None or an integer >= 1, got 2.5"),
        (lambda: AlexNet((3, 64, 64), 3, input_size=0), ValueError,
         "input_size must be None or an integer >= 1"),
        (lambda: FDFA(fc(), momentum=1.0), ValueError,
         "momentum must be a number in [0, 1), got 1.0"),
        (lambda: FDFA(fc(), feedback_update="sgd"), ValueError,
         "feedback_update must be 'adam' or 'ema', got 'sgd'"),
        (lambda: FDFA(fc(), n_directions=0), ValueError,
         "n_directions must be an integer >= 1, got 0"),
        (lambda: DKP(fc(), feedback_lr=float("inf")), ValueError,
         "feedback_lr must be a finite number > 0, got inf"),
        (lambda: FGW(fc(), perturbation="uniform"), ValueError,
         "perturbation must be 'gaussian' or 'rademacher'"),
        (lambda: FGA(fc(), per_sample="yes"), TypeError,
         "per_sample must be True or False, got 'yes'"),
        (lambda: DirectFeedbackRule(fc(), init="ones"), ValueError,
         "init must be 'zeros' or 'kaiming'"),
        (lambda: tensor_data(batch_size=1), ValueError,
         "batch_size must be an integer >= 2 (BatchNorm needs 2"),
        (lambda: tensor_data(augment="yes"), ValueError,
         "augment must be 'none' or 'flip_crop', got 'yes'"),
    ],
)  # fmt: skip
def test_a_component_names_its_argument_not_a_config_key(build, kind, message):
    with pytest.raises(kind) as err:
        build()
    assert str(err.value).startswith(message)
    assert isinstance(err.value, FdfaError)  # a command still prints it as one error: line
    assert not any(s in str(err.value) for s in ("algorithm.", "model.", "dataset.", "e.g."))


def test_a_check_of_an_argument_the_function_lacks_is_refused_when_declared():
    with pytest.raises(TypeError, match="has no argument widht"):

        @check_arguments(widht=integer(1))
        def build(width=1):
            return width


class CheckedUserNet(BlockNet):
    """A user's network with checks of its own, plugged in by model._target_."""

    @check_arguments(depth=integer(1, example=3))
    def __init__(self, input_shape, num_classes, depth=1):
        super().__init__(input_shape, num_classes)


def test_the_config_check_names_the_key_of_a_users_checked_class():
    cfg = compose_config(["~model", f"+model._target_={__name__}.CheckedUserNet", "+model.depth=0"])
    with pytest.raises(FdfaError) as err:
        validate_config(cfg)
    assert str(err.value) == "model.depth must be an integer >= 1, got 0; e.g. model.depth=3"
    assert isinstance(err.value.__cause__, ArgumentError)  # the class's own error, mapped


def test_config_messages_write_values_as_the_config_does():
    with pytest.raises(FdfaError) as err:
        validate_config(compose_config(["algorithm=fg_a", "algorithm.per_sample=1"]))
    assert str(err.value) == (
        "algorithm.per_sample must be true or false, got 1; e.g. algorithm.per_sample=true"
    )
    with pytest.raises(FdfaError) as err:
        validate_config(compose_config(["model.width=0"]))
    assert str(err.value).startswith("model.width must be null or an integer >= 1, got 0")


@pytest.mark.parametrize("key", ["hydra.sweeper.n_trial=2", "+hydra.sweeper.n_trial=2"])
def test_a_sweeper_key_typo_names_the_closest_key(key):
    with pytest.raises(FdfaError) as err:
        preflight(["-m", "sweep=lr", key])
    assert str(err.value).startswith(
        "unknown key hydra.sweeper.n_trial: did you mean hydra.sweeper.n_trials?"
    )


@pytest.mark.parametrize(
    "args",
    [
        ["-m", "sweep=lr", "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.seed=1"],
        ["-m", "sweep=lr", "+hydra.sweeper.params.optimizer.weight_decay=interval(0,1e-3)"],
        ["-m", "sweep=lr", "hydra/sweeper/pruner=hyperband", "hydra.sweeper.pruner.min_resource=2"],
        ["-m", "sweep=lr", "hydra.sweeper.sampler._target_=optuna.samplers.CmaEsSampler",
         "+hydra.sweeper.sampler.sigma0=0.1"],  # a sampler of the user's choice takes its keys
        ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=0,1"],
        ["hydra.job.chdir=false", "+hydra.job.env_set.MY_VAR=1", "hydra.verbose=true"],
    ],
)  # fmt: skip
def test_valid_hydra_keys_pass(args, tmp_path):
    preflight([*args, f"hydra.run.dir={tmp_path}"])


@pytest.mark.slow
def test_cli_refuses_a_sweeper_key_typo_in_one_line(tmp_path):
    res = run_cli(["-m", "sweep=lr", "hydra.sweeper.n_trial=2", f"hydra.sweep.dir={tmp_path}"])
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [
        "error: unknown key hydra.sweeper.n_trial: did you mean hydra.sweeper.n_trials? "
        "(python run.py --cfg hydra lists all)"
    ]
    assert not (tmp_path / "optuna.db").exists()
