"""The comparison protocol (fdfa/protocol.py, the validation split in fdfa/data.py, best.ckpt):
choose on validation data, read the test set at the chosen epoch, intervals over seeds."""

import statistics

import pytest
import torch
import torch.nn.functional as F

from fdfa import checkpoint
from fdfa.data import validation_split
from fdfa.errors import FdfaError
from fdfa.models import FCNet
from fdfa.protocol import mean_ci, select_epoch, t_quantile
from fdfa.train import Run, evaluate, train
from tests.helpers import PrototypeData, compose_config, synthetic_overrides


def evaluation(epoch, val, test):
    return {"epoch": epoch, "step": 10 * epoch, "val/acc": val, "test/acc": test}


def test_selection_takes_the_first_best_validation_epoch_and_its_test_accuracy():
    records = [
        evaluation(1, 0.90, 0.91),
        {"epoch": 1, "step": 15, "align/mean_cos": 0.5},  # a metrics record: not an evaluation
        evaluation(2, 0.95, 0.93),
        evaluation(3, 0.95, 0.99),  # ties epoch 2 on validation: the first one stays
        evaluation(4, 0.94, 0.98),
    ]
    assert select_epoch(records) == {
        "best/val/acc": 0.95,
        "best/epoch": 2,
        "selected/test/acc": 0.93,
    }


def test_without_validation_the_last_epoch_is_selected_never_the_max():
    records = [{"epoch": 1, "test/acc": 0.97}, {"epoch": 2, "test/acc": 0.96}]
    assert select_epoch(records) == {
        "best/val/acc": None,
        "best/epoch": 2,
        "selected/test/acc": 0.96,
    }
    assert select_epoch([])["selected/test/acc"] is None


# Two-sided 95 % (and one 90 %) Student-t quantiles from the published tables.
T_TABLE = [
    (0.975, 1, 12.7062047),
    (0.975, 2, 4.30265273),
    (0.975, 3, 3.18244631),
    (0.975, 4, 2.77644511),
    (0.975, 9, 2.26215716),
    (0.975, 29, 2.04522964),
    (0.975, 100, 1.98397152),
    (0.95, 5, 2.01504837),
]


@pytest.mark.parametrize("p, df, expected", T_TABLE)
def test_t_quantiles_match_the_tables(p, df, expected):
    assert t_quantile(p, df) == pytest.approx(expected, abs=5e-8)


def test_confidence_interval_is_t_times_the_standard_error():
    values = [0.97, 0.975, 0.968, 0.972, 0.971]
    mean, half = mean_ci(values)
    assert mean == pytest.approx(statistics.fmean(values))
    assert half == pytest.approx(2.77644511 * statistics.stdev(values) / 5**0.5, rel=1e-8)
    assert mean_ci([0.9]) == (0.9, None)


def test_validation_split_is_disjoint_fixed_by_split_seed_alone():
    train_idx, val_idx = validation_split(100, 20, split_seed=0)
    assert len(val_idx) == 20 and len(train_idx) == 80
    assert set(train_idx.tolist()) | set(val_idx.tolist()) == set(range(100))
    assert not set(train_idx.tolist()) & set(val_idx.tolist())
    torch.manual_seed(123)  # the run's seed does not move it
    assert torch.equal(validation_split(100, 20, 0)[1], val_idx)
    assert not torch.equal(validation_split(100, 20, 1)[1], val_idx)
    assert torch.equal(train_idx, train_idx.sort().values)  # the rest keeps its order
    with pytest.raises(FdfaError, match="dataset.val_size must be between 0 and 98"):
        validation_split(100, 99, 0)


def _rows(x: torch.Tensor) -> set:
    return {tuple(r.flatten().tolist()) for r in x}


def test_validation_images_never_appear_in_training_batches():
    data = PrototypeData(train_size=256, val_size=64, batch_size=32, noise=0.5)
    assert len(data.val_y) == 64 and len(data.train_y) == 192
    seen = set()
    for x, _ in data.train_batches():
        seen |= _rows(x)
    assert len(seen) == 192 and not seen & _rows(data.transform(data.val_x, train=False))
    full = PrototypeData(train_size=256, val_size=0, noise=0.5)
    assert len(full.val_y) == 0 and list(full.eval_splits()) == ["test"]
    # subset keeps the first N of the images left for training; validation stays the same
    small = PrototypeData(train_size=256, val_size=64, subset=50, noise=0.5)
    assert torch.equal(small.val_x, data.val_x) and torch.equal(small.train_x, data.train_x[:50])


@pytest.mark.parametrize("overrides", [["seed=1"], ["seed=2", "algorithm=dfa"]])
def test_every_run_seed_and_rule_validates_on_the_same_images(overrides):
    base = Run(compose_config(synthetic_overrides("trainer.epochs=1")), "/tmp/unused-a").setup()
    other = Run(
        compose_config(synthetic_overrides("trainer.epochs=1", *overrides)), "/tmp/unused-b"
    ).setup()
    assert torch.equal(base.data.val_x, other.data.val_x)
    moved = Run(
        compose_config(synthetic_overrides("trainer.epochs=1", "dataset.split_seed=1")),
        "/tmp/unused-c",
    ).setup()
    assert not torch.equal(base.data.val_x, moved.data.val_x)


def test_records_carry_val_and_the_summary_selects_on_it(tmp_path):
    cfg = compose_config(synthetic_overrides("algorithm=dfa", "trainer.epochs=4", "model.width=32"))
    summary = train(cfg, tmp_path)
    evaluations = [r for r in Run(cfg, tmp_path).setup().records if "test/acc" in r]
    assert all({"val/loss", "val/acc"} <= set(r) for r in evaluations)
    assert {k: summary[k] for k in ("best/val/acc", "best/epoch", "selected/test/acc")} == (
        select_epoch(evaluations)
    )
    assert summary["best/test/acc"] == max(r["test/acc"] for r in evaluations)


def test_best_checkpoint_reloads_to_the_weights_that_scored_best_val(tmp_path):
    # a noisy task at a high lr: validation accuracy peaks at epoch 3 of 5 (seed 0)
    overrides = ["algorithm=fdfa", "model.width=32", "+dataset.noise=2.5", "optimizer.lr=3e-2"]
    cfg = compose_config(synthetic_overrides("trainer.epochs=5", *overrides))
    summary = train(cfg, tmp_path / "run")
    last = [r for r in Run(cfg, tmp_path / "run").setup().records if "val/acc" in r][-1]
    assert summary["best/epoch"] < 5
    assert (last["val/acc"], last["test/acc"]) != (
        summary["best/val/acc"],
        summary["selected/test/acc"],
    )  # so the last epoch's weights would fail the check below
    best = checkpoint.load(tmp_path / "run" / "best.ckpt")
    assert best["record"]["epoch"] == summary["best/epoch"]
    fresh = Run(compose_config(synthetic_overrides(*overrides)), tmp_path / "fresh").setup()
    fresh.rule.load_state_dict(best["rule"])
    scores = evaluate(fresh.model, fresh.data)
    assert scores["val/acc"] == summary["best/val/acc"]
    assert scores["test/acc"] == summary["selected/test/acc"]


def test_evaluation_runs_the_model_in_eval_mode_and_leaves_batchnorm_alone():
    """evaluate() on a model left in train mode (as training leaves it): BatchNorm's running
    statistics are not updated, and the numbers are those of the eval-mode model (running
    statistics, not each test batch's own)."""
    torch.manual_seed(0)
    data = PrototypeData(image_shape=(1, 8, 8), train_size=256, val_size=64, noise=0.5)
    data.setup(torch.device("cpu"))
    model = FCNet((1, 8, 8), 4, n_layers=2, width=16)
    with torch.no_grad():  # running statistics away from the test batches' own
        for x, _ in data.train_batches():
            model(x * 3 + 1)
    model.train()
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    scores = evaluate(model, data)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in buffers.items())
    model.eval()
    with torch.no_grad():
        for split, (images, labels) in data.eval_splits().items():
            logits = model(data.transform(images, train=False))
            expected = F.cross_entropy(logits, labels).item()
            assert scores[f"{split}/loss"] == pytest.approx(expected, rel=1e-5)
            assert scores[f"{split}/acc"] == (logits.argmax(1) == labels).float().mean().item()
