"""Networks as a stack of hidden blocks plus an output layer.

The interface every learning rule relies on (a user's own network needs exactly this):

- ``__init__(input_shape, num_classes, ...)``: ``input_shape`` is ``(C, H, W)`` of one sample.
- ``blocks``: an ``nn.ModuleList``; block l maps h_{l-1} to h_l (h_0 is the input batch).
  DFA-family rules inject their error at each block's output and backpropagate inside that
  block only.
- ``head``: the output layer mapping h_L to logits of shape ``[batch, num_classes]``; it always gets
  its exact gradient.
- ``input_shape`` and ``num_classes`` attributes.
- optional ``input_size``: an int; the data pipeline resizes images to ``input_size x input_size``.

Subclassing :class:`BlockNet` gives ``forward`` for free.
"""

from __future__ import annotations

import torch
from torch import nn

from fdfa.checks import boolean, check_arguments, integer
from fdfa.errors import FdfaError


class BlockNet(nn.Module):
    """Base class: ``forward`` runs the blocks in order, then the head."""

    blocks: nn.ModuleList
    head: nn.Module

    def __init__(self, input_shape, num_classes: int):
        super().__init__()
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes = int(num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


class FCNet(BlockNet):
    """n hidden layers of Linear -> BatchNorm1d -> ReLU, then a Linear output layer
    (``batchnorm=False``: Linear -> ReLU, the net of the reference's FG-W script)."""

    @check_arguments(
        n_layers=integer(1, example=2), width=integer(1, example=800, null=True),
        batchnorm=boolean(),
    )  # fmt: skip
    def __init__(
        self,
        input_shape,
        num_classes: int,
        n_layers: int = 2,
        width: int | None = None,
        batchnorm: bool = True,
    ):
        super().__init__(input_shape, num_classes)
        if width is None:  # the reference code's widths: 800 for 28x28 digits, 1000 for CIFAR
            width = 800 if _numel(self.input_shape) <= 28 * 28 else 1000
        self.width = int(width)
        blocks = []
        fan_in = _numel(self.input_shape)
        for i in range(n_layers):
            layers = [nn.Flatten()] if i == 0 else []
            layers.append(nn.Linear(fan_in, self.width))
            layers += [nn.BatchNorm1d(self.width)] if batchnorm else []
            layers.append(nn.ReLU())
            blocks.append(nn.Sequential(*layers))
            fan_in = self.width
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(self.width, num_classes)


class ShallowCNN(BlockNet):
    """15C5-P2-40C5-P2-128-10 (the paper). ``pool=[false, true]`` gives the reference code's
    15C5-40C5-P2-128-10 (``model=cnn_ref``).

    Block l is conv -> BN -> ReLU and ends there, where the reference code's conv networks hook
    their feedback: a 2x2 max-pool after conv l opens block l+1. So the DFA-family rules inject
    (and FDFA perturbs) at every position of each conv's output, and the error reaches conv l
    through all of them, not only through the pool's arg-max positions."""

    def __init__(
        self,
        input_shape,
        num_classes: int,
        channels=(15, 40),
        kernel_size: int = 5,
        pool=(True, True),
        hidden: int = 128,
    ):
        super().__init__(input_shape, num_classes)
        if len(channels) != len(pool):
            raise FdfaError(
                f"model.channels ({len(channels)} entries) and model.pool ({len(pool)}) must match"
            )
        c, h, w = self.input_shape
        blocks, pooled = [], False  # pooled: a pool follows the previous conv (opens this block)
        for out_c, do_pool in zip(channels, pool):
            layers = [nn.MaxPool2d(2)] if pooled else []
            h, w = (h // 2, w // 2) if pooled else (h, w)
            layers += [nn.Conv2d(c, out_c, kernel_size), nn.BatchNorm2d(out_c), nn.ReLU()]
            h, w = h - kernel_size + 1, w - kernel_size + 1
            if min(h, w) < (2 if do_pool else 1):  # a 2x2 pool needs at least 2x2
                raise FdfaError(
                    f"model=cnn cannot take {self.input_shape} inputs: they shrink to nothing; "
                    "use larger images or fewer/smaller conv layers"
                )
            blocks.append(nn.Sequential(*layers))
            c, pooled = out_c, do_pool
        if pooled:
            h, w = h // 2, w // 2
        blocks.append(
            nn.Sequential(
                *([nn.MaxPool2d(2)] if pooled else []),
                nn.Flatten(),
                nn.Linear(c * h * w, hidden),
                nn.BatchNorm1d(hidden),
                nn.ReLU(),
            )
        )
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(hidden, num_classes)


class AlexNet(BlockNet):
    """The reference code's AlexNet with BatchNorm (conv 64-192-384-256-256, FC 4096-4096).

    Block l is conv -> BN -> ReLU (-> max-pool); the fifth block also average-pools to 6x6 and
    flattens. No dropout, as in the reference. Inputs are resized to ``input_size`` (224).
    """

    input_size = 224

    @check_arguments(input_size=integer(1, example=224, null=True))
    def __init__(self, input_shape, num_classes: int, input_size: int = 224, fc_width: int = 4096):
        super().__init__(input_shape, num_classes)
        self.input_size = int(input_size)
        c, h, w = self.input_shape
        if min(h, w) < 63:
            raise FdfaError(
                f"model=alexnet needs images of at least 63x63, got {h}x{w}; "
                "set model.input_size (default 224) so the data pipeline resizes them"
            )

        def conv(cin, cout, k, stride=1, pad=0, pool=False, tail=()):
            layers = [nn.Conv2d(cin, cout, k, stride, pad), nn.BatchNorm2d(cout), nn.ReLU()]
            if pool:
                layers.append(nn.MaxPool2d(3, 2))
            return nn.Sequential(*layers, *tail)

        def fc(fin, fout):
            return nn.Sequential(nn.Linear(fin, fout), nn.BatchNorm1d(fout), nn.ReLU())

        self.blocks = nn.ModuleList(
            [
                conv(c, 64, 11, 4, 2, pool=True),
                conv(64, 192, 5, pad=2, pool=True),
                conv(192, 384, 3, pad=1),
                conv(384, 256, 3, pad=1),
                conv(256, 256, 3, pad=1, pool=True, tail=(nn.AdaptiveAvgPool2d(6), nn.Flatten())),
                fc(256 * 6 * 6, fc_width),
                fc(fc_width, fc_width),
            ]
        )
        self.head = nn.Linear(fc_width, num_classes)


BLOCK_NET = ("blocks", "head", "input_shape", "num_classes")  # what the rules need of a model


def is_block_net(model) -> bool:
    """Whether ``model`` has the interface the rules need (``blocks`` an nn.ModuleList)."""
    has_all = all(hasattr(model, a) for a in BLOCK_NET)
    return has_all and isinstance(model.blocks, nn.ModuleList)


def check_block_net(model: nn.Module) -> None:
    """Raise a clear error when a (user) model lacks the interface the rules need."""
    if not is_block_net(model):
        missing = [a for a in BLOCK_NET if not hasattr(model, a)]
        name = type(model).__name__
        raise FdfaError(
            f"model {name} lacks {', '.join(missing) or 'blocks as nn.ModuleList'}: a model needs "
            "blocks (nn.ModuleList), head, input_shape and num_classes (see fdfa/models.py)"
        )


@torch.no_grad()
def hidden_shapes(model: nn.Module) -> list[tuple[int, ...]]:
    """Per-sample shape of each block output, found by one probe forward in eval mode."""
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        h = torch.zeros(1, *model.input_shape, device=param.device, dtype=param.dtype)
        shapes = []
        for block in model.blocks:
            h = block(h)
            shapes.append(tuple(h.shape[1:]))
        out = model.head(h)
    finally:
        model.train(was_training)
    if tuple(out.shape) != (1, model.num_classes):
        raise FdfaError(
            f"model head gives shape {tuple(out.shape[1:])}, expected ({model.num_classes},)"
        )
    return shapes
