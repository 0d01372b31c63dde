"""Config composition with the Hydra API: every group option composes and builds."""

import json
from pathlib import Path

import pytest
from hydra.utils import instantiate

from fdfa.train import train
from tests.helpers import CONF, compose_config, synthetic_overrides

GROUPS = {
    g: sorted(p.stem for p in (CONF / g).glob("*.yaml"))
    for g in ("algorithm", "model", "dataset", "optimizer", "logger", "trainer")
}


def test_groups_offer_the_documented_options():
    assert set(GROUPS["algorithm"]) >= {"bp", "dfa", "dkp", "fdfa"}
    assert set(GROUPS["model"]) >= {"fc", "cnn", "cnn_ref", "alexnet"}
    assert GROUPS["dataset"] == ["cifar10", "cifar100", "fake", "fashion_mnist", "mnist"]
    assert GROUPS["optimizer"] == ["adam", "sgd"]


def test_defaults_match_the_reference_code():
    cfg = compose_config()
    assert cfg.algorithm._target_ == "fdfa.rules.FDFA" and cfg.algorithm.feedback_update == "adam"
    assert cfg.optimizer._target_ == "torch.optim.Adam" and cfg.optimizer.lr == 1e-4
    assert cfg.algorithm.feedback_lr == 1e-4
    assert (cfg.scheduler.step_size, cfg.scheduler.gamma) == (1, 0.95)
    assert (cfg.dataset.batch_size, cfg.dataset.test_batch_size) == (64, 1000)
    assert (cfg.dataset.mean, cfg.dataset.std) == (0.5, 0.5)
    assert cfg.trainer.epochs == 100 and cfg.model.n_layers == 2
    assert compose_config(["dataset=cifar100"]).dataset.augment == "flip_crop"


@pytest.mark.parametrize("group", ["algorithm", "model", "dataset", "optimizer", "logger"])
def test_every_option_composes(group):
    for option in GROUPS[group]:
        cfg = compose_config([f"{group}={option}"])
        assert cfg[group] is not None or group == "logger"


@pytest.mark.parametrize("model", ["fc", "cnn", "cnn_ref", "alexnet"])
@pytest.mark.parametrize("algorithm", ["bp", "dfa", "dkp", "fdfa"])
def test_every_model_and_rule_build_from_config(model, algorithm):
    cfg = compose_config([f"model={model}", f"algorithm={algorithm}"])
    shape = (3, cfg.model.input_size, cfg.model.input_size) if model == "alexnet" else (1, 28, 28)
    net = instantiate(cfg.model, input_shape=shape, num_classes=10)
    rule = instantiate(cfg.algorithm, model=net)
    opt = instantiate(cfg.optimizer)(net.parameters())
    instantiate(cfg.scheduler)(opt)
    assert rule.model is net


def test_fake_dataset_builds_with_cifar100_shapes():
    cfg = compose_config(
        ["dataset=fake", "dataset.train_size=20", "dataset.val_size=4", "dataset.test_size=8"]
    )
    data = instantiate(cfg.dataset)
    assert tuple(data.train_x.shape) == (16, 3, 32, 32) and data.num_classes == 100


def test_user_model_plugs_in_from_config(tmp_path):
    """model._target_ pointing at a class defined outside fdfa trains with every rule."""
    for algorithm in ("bp", "dfa", "dkp", "fdfa"):
        cfg = compose_config(
            synthetic_overrides(
                f"algorithm={algorithm}",
                "~model",
                "+model._target_=tests.helpers.TinyUserNet",
                "+model.hidden=8",
                "trainer.epochs=1",
                "trainer.device=cpu",
            )
        )
        summary = train(cfg, tmp_path / algorithm)
        assert summary["model"] == "tinyusernet" and summary["steps"] == 8
        records = [json.loads(line) for line in Path(tmp_path / algorithm / "metrics.jsonl").open()]
        assert len(records) == 1 and 0 <= records[0]["test/acc"] <= 1


def test_smoke_training_on_the_synthetic_task_writes_outputs(tmp_path):
    cfg = compose_config(
        synthetic_overrides(
            "algorithm=fdfa",
            "trainer.epochs=3",
            "logger=csv",
            "optimizer.lr=1e-3",
            "algorithm.feedback_lr=1e-2",
        )
    )
    summary = train(cfg, tmp_path)
    assert summary["best/test/acc"] > 0.9  # smoke: chance is 0.25, but the head alone gets 1.0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert [r["step"] for r in records] == [8, 16, 24]
    for r in records:
        assert {"epoch", "step", "train/loss", "test/loss", "test/acc", "lr", "time_s"} <= set(r)
    assert records[1]["lr"] == pytest.approx(records[0]["lr"] * 0.95)  # StepLR per epoch
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["best/test/acc"] == max(r["test/acc"] for r in records)
    assert saved["test/acc"] == records[-1]["test/acc"] and saved["epochs"] == 3
    for key in ("train/loss", "steps", "wall_s", "train/samples_per_s", "algorithm", "dataset"):
        assert key in saved
    assert (tmp_path / "metrics.csv").read_text().count("\n") == 4  # header + 3 rows


def test_same_seed_same_result(tmp_path):
    overrides = synthetic_overrides("algorithm=fdfa", "trainer.max_steps=5")
    a = train(compose_config(overrides), tmp_path / "a")
    b = train(compose_config(overrides), tmp_path / "b")
    assert a["train/loss"] == b["train/loss"] and a["test/loss"] == b["test/loss"]


def test_max_steps_caps_training(tmp_path):
    summary = train(compose_config(synthetic_overrides("trainer.max_steps=3")), tmp_path)
    assert summary["steps"] == 3 and summary["epochs"] == 1


def test_an_algorithm_brings_its_own_forward_lr_and_an_explicit_lr_wins():
    """conf/algorithm/optimizer/<algorithm>_<optimizer>.yaml, when it exists, merges over the
    optimizer's defaults: FG-W's Adam lr is the reference FG-W script's 1e-3, the other rules keep
    the shared 1e-4. An optimizer.lr on the command line (or a sweeper's trial) wins; the
    experiment presets set no lr, so the rule's own applies there too; SGD keeps its own lr."""

    def lr(*overrides):
        return compose_config(list(overrides)).optimizer.lr

    assert lr("algorithm=fg_w") == 1e-3
    assert lr("algorithm=fg_w", "optimizer.lr=3e-4") == 3e-4
    assert lr("experiment=mnist_fc2", "algorithm=fg_w") == 1e-3
    assert lr("experiment=mnist_fc2", "algorithm=fg_w", "optimizer.lr=3e-4") == 3e-4
    assert lr("sweep=compare", "algorithm=fg_w") == 1e-3
    assert lr("algorithm=fg_w", "optimizer=sgd") == 0.01
    for algorithm in ("bp", "dfa", "dkp", "fdfa", "fg_a"):
        assert lr(f"algorithm={algorithm}") == 1e-4, algorithm
    cfg = compose_config(["algorithm=fg_w"])
    assert "lr" not in cfg.algorithm  # never passed to the rule as a keyword
    assert cfg.optimizer._target_ == "torch.optim.Adam" and cfg.optimizer.betas == [0.9, 0.999]
