"""Data paths: real MNIST from $FDFA_DATA_DIR (default ../shared/data), CIFAR shapes through a
stand-in torchvision class."""

import numpy as np
import pytest
import torch
import torchvision

from fdfa.data import TorchvisionData
from fdfa.train import train
from tests.helpers import REPO, compose_config, mnist_raw


def test_the_tests_find_real_mnist_under_fdfa_data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("FDFA_DATA_DIR", str(tmp_path))
    assert mnist_raw() == tmp_path / "MNIST" / "raw"
    monkeypatch.delenv("FDFA_DATA_DIR")
    assert mnist_raw() == REPO.parent / "shared" / "data" / "MNIST" / "raw"


@pytest.mark.slow
def test_real_mnist_loads_as_uint8_tensors(mnist_root):
    data = TorchvisionData("mnist", str(mnist_root), batch_size=64)
    assert tuple(data.train_x.shape) == (60000, 1, 28, 28) and data.train_x.dtype == torch.uint8
    assert tuple(data.test_x.shape) == (10000, 1, 28, 28) and data.num_classes == 10
    counts = torch.bincount(data.train_y).tolist()
    assert counts[:3] == [5923, 6742, 5958]  # as documented for these archives
    x, y = next(iter(data.test_batches()))
    assert x.shape == (1000, 1, 28, 28) and x.min() == -1 and x.max() == 1  # Normalize(0.5, 0.5)
    assert data.steps_per_epoch == 938  # 60000 / 64, last partial batch kept


@pytest.mark.slow
def test_subset_keeps_the_first_samples(mnist_root):
    full = TorchvisionData("mnist", str(mnist_root))
    sub = TorchvisionData("mnist", str(mnist_root), subset=1000)
    assert len(sub.train_y) == 1000 and torch.equal(sub.train_x, full.train_x[:1000])


def test_batches_cover_the_epoch_once_and_skip_a_lone_last_sample():
    x = torch.arange(65, dtype=torch.uint8).view(65, 1, 1, 1)
    data = TorchvisionData.__new__(TorchvisionData)
    TorchvisionData.__bases__[0].__init__(
        data, x, torch.zeros(65), x, torch.zeros(65), 2, batch_size=16, mean=0.0, std=1 / 255
    )
    seen = torch.cat([b.flatten() for b, _ in data.train_batches()])
    assert data.steps_per_epoch == 4 and len(seen) == 64  # a batch of 1 breaks BatchNorm
    assert len(set(seen.round().tolist())) == 64


class FakeCIFAR:
    """Stands in for torchvision.datasets.CIFAR10/100: same attributes, random pixels."""

    n_classes = 100

    def __init__(self, root, train=True, download=True):
        n = 40 if train else 12
        rng = np.random.default_rng(0 if train else 1)
        self.data = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        self.targets = rng.integers(0, self.n_classes, n).tolist()
        self.classes = [str(i) for i in range(self.n_classes)]


def test_cifar100_alexnet_path_resizes_and_augments(monkeypatch, tmp_path):
    monkeypatch.setattr(torchvision.datasets, "CIFAR100", FakeCIFAR)
    cfg = compose_config(
        [
            "dataset=cifar100",
            "model=alexnet",
            "model.fc_width=64",
            "dataset.batch_size=8",
            "dataset.val_size=8",  # of the stand-in's 40 training images
            "trainer.max_steps=2",
            "logger=none",
        ]
    )
    summary = train(cfg, tmp_path)
    assert summary["steps"] == 2 and summary["dataset"] == "cifar100"
    data = TorchvisionData("cifar100", str(tmp_path), augment="flip_crop").setup(
        torch.device("cpu"), resize_to=224
    )
    x, _ = next(data.train_batches())
    assert x.shape == (64 if len(data.train_y) >= 64 else 40, 3, 224, 224)
    x_test, _ = next(data.test_batches())
    assert x_test.shape == (12, 3, 224, 224)


def test_cifar10_keeps_native_shape(monkeypatch, tmp_path):
    class FakeCIFAR10(FakeCIFAR):
        n_classes = 10

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    data = TorchvisionData("cifar10", str(tmp_path))
    assert data.image_shape == (3, 32, 32) and data.num_classes == 10


@pytest.mark.slow
@pytest.mark.parametrize(
    "algorithm, reference",
    # the reference code (the paper's main.py), MNIST FC-2x800, 1 epoch, seed 0, measured here
    [("bp", 0.9713), ("dfa", 0.9508), ("dkp", 0.9563), ("fdfa", 0.9702)],
)
def test_one_epoch_on_real_mnist_matches_the_reference(mnist_root, tmp_path, algorithm, reference):
    cfg = compose_config(
        [
            f"algorithm={algorithm}",
            "trainer.epochs=1",
            f"dataset.root={mnist_root}",
            "logger=none",
            "trainer.device=cpu",
        ]
    )
    summary = train(cfg, tmp_path)
    assert summary["test/acc"] >= reference - 0.005  # single runs: 0.5 points of seed noise
