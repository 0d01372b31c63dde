"""Datasets held as uint8 tensors on the training device and batched by indexing.

No per-sample PIL work and no DataLoader workers: a batch is ``x[idx]``, converted to float,
normalised, and (where configured) augmented or resized as one batched op on the device.
"""

from __future__ import annotations

import errno
import hashlib
import math
import socket
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fdfa.checks import check_arguments, image_shape, integer, one_of, per_channel
from fdfa.errors import FdfaError, OptionError, one_line

# torchvision class name and expected raw files of each dataset name used in conf/dataset/.
_TORCHVISION = {
    "mnist": ("MNIST", "MNIST/raw", [
        "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
    ]),
    "fashion_mnist": ("FashionMNIST", "FashionMNIST/raw", [
        "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
    ]),
    "cifar10": ("CIFAR10", ".", ["cifar-10-python.tar.gz"]),
    "cifar100": ("CIFAR100", ".", ["cifar-100-python.tar.gz"]),
}  # fmt: skip

DOWNLOAD_TIMEOUT_S = 30  # an offline machine must fail fast, not hang on a socket

# The extracted idx files of MNIST and Fashion-MNIST (torchvision reads them, and extracts them
# only when one is missing): file -> (magic number, number of items). A truncated file or one
# under another's name (swapped train/test labels) is caught from its 16-byte header and size.
_IDX_FILES = {
    "train-images-idx3-ubyte": (2051, 60000),
    "train-labels-idx1-ubyte": (2049, 60000),
    "t10k-images-idx3-ubyte": (2051, 10000),
    "t10k-labels-idx1-ubyte": (2049, 10000),
}


class TensorData:
    """Train/validation/test images as uint8 ``[N, C, H, W]`` tensors plus int64 labels.

    ``batch_size``/``test_batch_size``: samples per step / per evaluation batch.
    ``val_size``: training images held out as the validation set (0: none, train on all). They
    are drawn from the whole training set by ``split_seed`` alone, so every rule and run seed
    (and every ``subset``) sees the same validation images, and never trains on them.
    ``subset``: then keep only the first N of the remaining training samples (None: all).
    ``mean``/``std``: per-channel normalisation after scaling to [0, 1].
    ``augment``: ``none`` or ``flip_crop`` (per-sample random flip + random resized crop).
    """

    name = "tensors"
    # Under torchrun (fdfa/distributed.py): this rank's slice of every global batch of
    # ``ranks * batch_size`` samples; set by ``shard``. One process: rank 0 of 1.
    rank, ranks = 0, 1

    @check_arguments(
        batch_size=integer(2, example=64, note=" (BatchNorm needs 2 samples per batch)"),
        test_batch_size=integer(1, example=1000),
        val_size=integer(0, example=0),
        split_seed=integer(example=0),
        subset=integer(2, example=1000, null=True),
        augment=one_of("none", "flip_crop"),
        mean=per_channel(0.5),
        std=per_channel(0.5, positive=True),  # 0 would divide every pixel by zero
    )
    def __init__(
        self,
        train_x,
        train_y,
        test_x,
        test_y,
        num_classes: int,
        batch_size: int = 64,
        test_batch_size: int = 1000,
        val_size: int = 0,
        split_seed: int = 0,
        subset: int | None = None,
        mean: float | list = 0.5,
        std: float | list = 0.5,
        augment: str = "none",
    ):
        for split, labels in (("training", train_y), ("test", test_y)):
            check_labels(labels, num_classes, split)
        train_idx, val_idx = validation_split(len(train_y), val_size, split_seed)
        self.val_x, self.val_y = train_x[val_idx], train_y[val_idx].long()
        train_x, train_y = train_x[train_idx], train_y[train_idx]
        if subset is not None:
            train_x, train_y = train_x[:subset], train_y[:subset]
        self.train_x, self.train_y = train_x, train_y.long()
        self.test_x, self.test_y = test_x, test_y.long()
        self.num_classes = int(num_classes)
        self.batch_size = int(batch_size)
        self.test_batch_size = int(test_batch_size)
        self.augment = augment
        c = train_x.shape[1]
        self.mean = per_channel_tensor(mean, c, "mean")
        self.std = per_channel_tensor(std, c, "std")
        self.resize_to: int | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape of one sample as the model sees it (after any resize)."""
        c, h, w = self.train_x.shape[1:]
        if self.resize_to:
            return (c, self.resize_to, self.resize_to)
        return (c, h, w)

    def setup(self, device: torch.device, resize_to: int | None = None) -> TensorData:
        """Move the tensors to ``device``; resize batches to ``resize_to`` (model input_size)."""
        self.resize_to = int(resize_to) if resize_to else None
        for key in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y", "mean", "std"):
            setattr(self, key, getattr(self, key).to(device))
        return self

    def shard(self, rank: int, ranks: int) -> TensorData:
        """Train on rank ``rank``'s slice of each global batch of ``ranks * batch_size`` samples
        (``batch_size`` per rank). A last global batch smaller than that is left out: every rank
        takes the same number of samples each step, so the mean of their gradients is the
        gradient of the whole global batch."""
        self.rank, self.ranks = int(rank), int(ranks)
        return self

    @property
    def steps_per_epoch(self) -> int:
        n, b = len(self.train_y), self.batch_size
        if self.ranks > 1:
            return n // (b * self.ranks)
        return n // b + (1 if n % b > 1 else 0)  # a last batch of 1 would break BatchNorm

    def epoch_permutation(self) -> torch.Tensor:
        """A fresh shuffle of the training set (CPU tensor, from torch's global RNG)."""
        return torch.randperm(len(self.train_y))

    def train_batches(self, perm: torch.Tensor | None = None, start: int = 0):
        """(x, y) batches of one epoch in the order ``perm``, from batch index ``start`` on (for a
        resumed epoch). The last partial batch is kept unless it has a single sample."""
        perm = (self.epoch_permutation() if perm is None else perm).to(self.train_y.device)
        b, first = self.batch_size, self.rank * self.batch_size  # this rank's slice of a batch
        for i in range(start, self.steps_per_epoch):
            idx = perm[i * b * self.ranks + first :][:b]
            yield self.transform(self.train_x[idx], train=True), self.train_y[idx]

    def eval_splits(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The evaluated sets by name: ``val`` (when held out) and ``test``."""
        splits = {"val": (self.val_x, self.val_y)} if len(self.val_y) else {}
        return {**splits, "test": (self.test_x, self.test_y)}

    def eval_batches(self, split: str = "test"):
        """(x, y) batches of ``test_batch_size`` over one evaluated set, in order, untransformed
        by augmentation."""
        images, labels = self.eval_splits()[split]
        for i in range(0, len(labels), self.test_batch_size):
            sl = slice(i, i + self.test_batch_size)
            yield self.transform(images[sl], train=False), labels[sl]

    def test_batches(self):
        return self.eval_batches("test")

    def transform(self, x: torch.Tensor, train: bool) -> torch.Tensor:
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        x = (x - self.mean) / self.std
        if train and self.augment == "flip_crop":
            return random_resized_crop_flip(x, self.resize_to or x.shape[-1])
        if self.resize_to and x.shape[-1] != self.resize_to:
            return F.interpolate(x, size=(self.resize_to, self.resize_to), mode="bilinear")
        return x


def check_labels(labels: torch.Tensor, num_classes: int, split: str, owner: str = "", fix=""):
    """Refuse labels outside [0, num_classes) (the model has num_classes outputs) when the data
    loads, not as an IndexError in the loss after an epoch. ``owner`` names the dataset, ``fix``
    says what to do."""
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes:
        raise FdfaError(
            f"the {split} labels range over {int(labels.min())}..{int(labels.max())} but "
            f"{owner or 'the dataset'} has {num_classes} classes (0..{num_classes - 1}): "
            + (fix or "fix the labels, or set the dataset's num_classes to cover them")
        )


def per_channel_tensor(value, channels: int, key: str) -> torch.Tensor:
    """dataset.mean or dataset.std as a [1, C, 1, 1] tensor: one number for every channel, or
    one per channel."""
    plain = isinstance(value, (int, float, torch.Tensor))
    t = torch.as_tensor(value if plain else list(value), dtype=torch.float32)
    if t.numel() not in (1, channels):
        raise OptionError(
            f"dataset.{key} has {t.numel()} values but the images have {channels} channel"
            + (f"s: give one number, or {channels}" if channels > 1 else ": give one number")
            + f"; e.g. dataset.{key}=0.5"
        )
    return t.expand(channels).reshape(1, channels, 1, 1)


def validation_split(n: int, val_size: int, split_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, validation) of a training set of ``n``: ``val_size`` drawn at random by
    ``split_seed`` (its own generator, so the run's seed never moves it), the rest in their
    original order (so ``subset`` keeps meaning "the first N")."""
    if not 0 <= val_size <= n - 2:
        raise FdfaError(
            f"dataset.val_size must be between 0 and {n - 2} (the training set has {n} images), "
            f"got {val_size}; 0 trains on every image with no validation set"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


def random_resized_crop_flip(
    x: torch.Tensor, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)
) -> torch.Tensor:
    """Per-sample RandomResizedCrop(size) + RandomHorizontalFlip as one batched grid_sample.

    Crop area fraction ~ U(scale), log aspect ratio ~ U(log ratio); a crop larger than the image
    is clamped to it (torchvision retries instead), placed uniformly; bilinear sampling."""
    n, _, h, w = x.shape
    dev = x.device
    area = torch.empty(n, device=dev).uniform_(*scale)
    log_r = torch.empty(n, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    r = torch.exp(log_r)
    cw = torch.sqrt(area * r).clamp(max=1.0)  # crop width / image width
    ch = torch.sqrt(area / r).clamp(max=1.0)
    cx = (torch.rand(n, device=dev) * 2 - 1) * (1 - cw)  # centre in [-1, 1] coordinates
    cy = (torch.rand(n, device=dev) * 2 - 1) * (1 - ch)
    flip = torch.where(torch.rand(n, device=dev) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0] = cw * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = ch
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, [n, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _images_as_uint8_nchw(data) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(data))
    if t.dim() == 3:  # MNIST: [N, H, W]
        return t.unsqueeze(1).contiguous()
    return t.permute(0, 3, 1, 2).contiguous()  # CIFAR: [N, H, W, C]


def load_torchvision(name: str, root: str, download: bool = True):
    """Train and test sets of a torchvision dataset as uint8 NCHW tensors + labels.

    Raises FdfaError with the files to provide when they are absent and cannot be downloaded."""
    import torchvision

    if name not in _TORCHVISION:
        raise FdfaError(f"unknown dataset name {name!r}; choose one of {sorted(_TORCHVISION)}")
    cls_name, folder, files = _TORCHVISION[name]
    cls = getattr(torchvision.datasets, cls_name)
    root_path = Path(root).expanduser()
    where = (root_path / folder).resolve()
    if folder.endswith("raw"):  # MNIST, Fashion-MNIST: extracted idx files torchvision would read
        _raise_first(_idx_problems(where))
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        train = cls(str(root_path), train=True, download=download)
        test = cls(str(root_path), train=False, download=download)
    except Exception as err:  # torchvision raises RuntimeError/URLError/OSError variously
        reason = one_line(err)
        if isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EROFS):
            raise FdfaError(
                f"{where} is not writable ({reason}): torchvision extracts the archives beside "
                "them (+55 MB for MNIST); make it writable, or copy the archives into a writable "
                "dataset.root (env FDFA_DATA_DIR)"
            ) from None
        tried = f" (downloading a new copy failed: {reason})" if download else ""
        _raise_first(_archive_problems(cls, where), tried)
        raise FdfaError(
            f"{cls_name} not found in {where} and not downloadable ({reason}): put "
            f"{', '.join(files)} into {where}/, or point dataset.root (env FDFA_DATA_DIR) "
            "at a folder that has them"
        ) from None
    finally:
        socket.setdefaulttimeout(old_timeout)
    for split, ds in (("train", train), ("test", test)):
        if len(ds.data) != len(ds.targets):
            raise FdfaError(
                f"{cls_name} in {where}: the {split} set has {len(ds.data)} images but "
                f"{len(ds.targets)} labels (files swapped or mixed up); delete the extracted files "
                "so torchvision extracts them again from the archives"
            )
        check_labels(
            torch.as_tensor(np.asarray(ds.targets)), len(ds.classes), split, owner=cls_name,
            fix=f"the label files in {where} are corrupt; delete the extracted files so "
            "torchvision extracts them again from the archives",
        )  # fmt: skip
    return (
        _images_as_uint8_nchw(train.data),
        torch.as_tensor(np.asarray(train.targets)),
        _images_as_uint8_nchw(test.data),
        torch.as_tensor(np.asarray(test.targets)),
        len(train.classes),
    )


def _raise_first(problems: list[str], suffix: str = "") -> None:
    if problems:
        raise FdfaError(problems[0] + suffix)


def _archive_problems(cls, where: Path) -> list[str]:
    """What is wrong with the downloaded archives present in ``where``, against torchvision's
    published MD5s: corrupt or truncated, or holding another archive (swapped, misnamed)."""
    if hasattr(cls, "resources"):  # MNIST, FashionMNIST
        expected = dict(cls.resources)
    else:  # CIFAR10, CIFAR100
        expected = {cls.filename: cls.tgz_md5}
    owner = {md5: name for name, md5 in expected.items()}
    problems = []
    for name, md5 in expected.items():
        path = where / name
        if not path.is_file():
            continue
        got = _md5(path)
        if got == md5:
            continue
        if got in owner:
            problems.append(
                f"{path} holds {owner[got]} (its MD5): the archives are swapped or misnamed; "
                "give each its right name"
            )
        else:
            problems.append(
                f"{path} is corrupt or truncated ({path.stat().st_size} bytes, MD5 {got}, not "
                f"torchvision's {md5}): delete it, and put a good copy there or let fdfa "
                "download it"
            )
    return problems


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _idx_problems(where: Path) -> list[str]:
    """What is wrong with the extracted idx files present in ``where`` (MNIST/raw): a header
    that is not theirs, another split's item count, or a size that does not fit the header."""
    problems = []
    fix = "delete it, and torchvision extracts it again from its .gz"
    for name, (magic, items) in _IDX_FILES.items():
        path = where / name
        if not path.is_file():
            continue
        with open(path, "rb") as f:
            header = f.read(16)
        dims = 3 if magic == 2051 else 1
        if len(header) < 4 + 4 * dims or struct.unpack(">I", header[:4])[0] != magic:
            problems.append(f"{path} is not an idx file of {name}'s kind (bad header): {fix}")
            continue
        shape = struct.unpack(f">{dims}I", header[4 : 4 + 4 * dims])
        if shape[0] != items:
            problems.append(
                f"{path} holds {shape[0]} items, not {items}: it is another split's file (train "
                f"and test swapped or misnamed); {fix}"
            )
            continue
        size = 4 + 4 * dims + math.prod(shape)
        if path.stat().st_size != size:
            problems.append(
                f"{path} is truncated or corrupt ({path.stat().st_size} bytes, not {size}): {fix}"
            )
    return problems


class TorchvisionData(TensorData):
    """MNIST, FashionMNIST, CIFAR-10 or CIFAR-100 from ``root`` (downloaded there if missing)."""

    def __init__(self, name: str, root: str, download: bool = True, **kwargs):
        self.name = name
        train_x, train_y, test_x, test_y, num_classes = load_torchvision(name, root, download)
        super().__init__(train_x, train_y, test_x, test_y, num_classes, **kwargs)


class FakeImageData(TensorData):
    """torchvision's FakeData (random images, random labels) for smoke runs and benchmarks."""

    name = "fake"

    @check_arguments(image_shape=image_shape((3, 32, 32)), num_classes=integer(1, example=10))
    def __init__(
        self,
        image_shape=(3, 32, 32),
        num_classes: int = 100,
        train_size: int = 1024,
        test_size: int = 256,
        **kwargs,
    ):
        from torchvision.datasets import FakeData

        def make(size, offset):
            ds = FakeData(size, tuple(image_shape), num_classes, random_offset=offset)
            xs, ys = zip(*(ds[i] for i in range(size)))
            x = _images_as_uint8_nchw(np.stack([np.asarray(im) for im in xs]))
            if len(image_shape) == 3 and image_shape[0] == 1 and x.shape[1] != 1:
                x = x.permute(0, 2, 3, 1)  # grayscale PIL images come back as [N, H, W]
            return x, torch.as_tensor(ys)

        train_x, train_y = make(train_size, 0)
        test_x, test_y = make(test_size, train_size)
        super().__init__(train_x, train_y, test_x, test_y, num_classes, **kwargs)
