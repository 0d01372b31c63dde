"""Small things the tests build on: where the real MNIST is, a learnable synthetic dataset, small
nets and batches, a user-defined model, config composition with the Hydra API."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from torch import nn
from torch.func import replace_all_batch_norm_modules_

from fdfa.data import TensorData
from fdfa.models import BlockNet, FCNet, ShallowCNN

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"


def mnist_raw() -> Path:
    """The real MNIST archives (<data root>/MNIST/raw/*.gz), read-only: tests link them into
    their own dirs and never write beside them. The data root is $FDFA_DATA_DIR, else
    ../shared/data beside the checkout."""
    root = os.environ.get("FDFA_DATA_DIR") or REPO.parent / "shared" / "data"
    return Path(root) / "MNIST" / "raw"


# Small nets the rule, metric and CUDA tests step on, and their input shapes.
NETS = {
    "fc": lambda: FCNet((1, 8, 8), 10, n_layers=3, width=32),
    "cnn": lambda: ShallowCNN((1, 16, 16), 10, channels=(4, 6), kernel_size=3, hidden=12),
}
SHAPES = {"fc": (1, 8, 8), "cnn": (1, 16, 16)}


def make_batch(shape=(1, 8, 8), n=16, classes=10, seed=0):
    """n random inputs of ``shape`` and labels in [0, classes), the same for the same seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)


class PrototypeData(TensorData):
    """Learnable synthetic task: each class is a fixed random image; samples add Gaussian noise."""

    name = "prototypes"

    def __init__(
        self,
        image_shape=(1, 8, 8),
        num_classes=4,
        train_size=256,
        test_size=128,
        noise=0.5,
        seed=0,
        **kwargs,
    ):
        g = torch.Generator().manual_seed(seed)
        protos = torch.randn(num_classes, *image_shape, generator=g)

        def make(n):
            y = torch.randint(0, num_classes, (n,), generator=g)
            return protos[y] + noise * torch.randn(n, *image_shape, generator=g), y

        train_x, train_y = make(train_size)
        test_x, test_y = make(test_size)
        kwargs.setdefault("mean", 0.0)
        kwargs.setdefault("std", 1.0)
        super().__init__(train_x, train_y, test_x, test_y, num_classes, **kwargs)


class TinyUserNet(BlockNet):
    """A network as a user would plug in with model._target_: one hidden block of 16 tanh units."""

    def __init__(self, input_shape, num_classes, hidden=16):
        super().__init__(input_shape, num_classes)
        n_in = 1
        for s in input_shape:
            n_in *= s
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.Flatten(), nn.Linear(n_in, hidden), nn.Tanh())]
        )
        self.head = nn.Linear(hidden, num_classes)


def logits_given_offsets(model: nn.Module, x: torch.Tensor):
    """f(*offsets) = the logits when offset_l is added to each block output h_l, on a copy whose
    BatchNorm uses batch statistics without touching buffers: jvp(f, zeros, us) = sum_l J_l u_l,
    the reference for every forward-mode tangent."""
    ref = copy.deepcopy(model)
    replace_all_batch_norm_modules_(ref)

    def f(*offsets):
        h = x
        for block, offset in zip(ref.blocks, offsets):
            h = block(h) + offset
        return ref.head(h)

    return f


def synthetic_overrides(*extra: str) -> list[str]:
    """Overrides that swap dataset=fake's class for the learnable PrototypeData (same keys)."""
    return [
        "dataset=fake",
        "dataset._target_=tests.helpers.PrototypeData",
        "dataset.image_shape=[1,8,8]",
        "dataset.num_classes=4",
        "dataset.train_size=320",  # 256 to train on, 64 to validate on
        "dataset.test_size=128",
        "dataset.batch_size=32",
        "dataset.val_size=64",
        "logger=none",
        *extra,
    ]


def compose_config(overrides: list[str] = ()):  # noqa: B006
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def run_cli(args: list[str], cwd: Path | None = None, timeout: int = 300):
    """python run.py ARGS in a subprocess; returns CompletedProcess with text output."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, str(REPO / "run.py"), *args],
        cwd=cwd or REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def crash_at_step(monkeypatch, cls, n: int) -> None:
    """Make ``cls.train_step`` raise KeyboardInterrupt at its ``n``-th call (a kill mid-run, after
    the checkpoints before it); ``monkeypatch.undo()`` or the test's end restores it."""
    real_step, calls = cls.train_step, {"n": 0}

    def step(self, x, y):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real_step(self, x, y)

    monkeypatch.setattr(cls, "train_step", step)


class UserNet(nn.Module):
    """A network as a user writes it: not an fdfa BlockNet; torch.flatten inside forward."""

    def __init__(self, num_classes=10, channels=3):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 8, 3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.layer = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.act(self.bn1(self.conv1(x)))
        x = self.pool(self.layer(x))
        return self.fc(torch.flatten(x, 1))


USER_BLOCKS = [["conv1", "bn1", "act"], "layer"]  # UserNet's parts, for fdfa.adapter.Wrapped
USER_HEAD = ["pool", "flatten", "fc"]


def user_wrapped(shape, classes):
    from fdfa.adapter import Wrapped

    return Wrapped(UserNet(classes, shape[0]), USER_BLOCKS, USER_HEAD, shape, classes)


# The presets of the networks of tests/test_networks.py, with the recipe each must compose to:
# preset -> (dataset, depth, model target, optimizer, lr, batch, epochs, scheduler class, augment)
RESNET = ("resnet.CifarResNet", "SGD", 0.1, 128)  # He et al. 2016: SGD 0.1, batch 128
NETWORK_PRESETS = {
    "cifar10_resnet20": ("cifar10", 20, *RESNET, 182, "MultiStepLR", "flip_crop"),
    "cifar10_resnet56": ("cifar10", 56, *RESNET, 182, "MultiStepLR", "flip_crop"),
    "fashion_mnist_resnet20": ("fashion_mnist", 20, *RESNET, 20, "MultiStepLR", "none"),
    "cifar10_vit": (
        "cifar10",
        6,
        "vit.ViT",
        "Adam",
        1e-3,
        128,
        200,
        "CosineAnnealingLR",
        "flip_crop",
    ),
}
