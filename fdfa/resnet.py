"""The CIFAR ResNets of He et al. 2016 ("Deep Residual Learning for Image Recognition", section 4.2)
as fdfa block networks: ``model=resnet20`` (depth 20) and ``model=resnet56`` (depth 56).

A 3x3 conv stem (16 channels, BatchNorm, ReLU), three stages of n basic blocks with 16, 32 and 64
channels (the first block of stages 2 and 3 halves the image with stride 2), global average
pooling and a linear output layer: depth = 6n + 2 weight layers. A basic block is
conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU.

Shortcut: option A by default, as He et al. use on CIFAR: the identity, and where a block
halves the image and doubles the channels, the input subsampled with stride 2 and zero-padded
to the new channels (no parameters: 0.27M parameters for ResNet-20, 0.85M for ResNet-56).
``shortcut=B`` projects with a 1x1 conv (stride 2) and BatchNorm there instead.

Hidden blocks (where DFA, DKP and FDFA inject feedback and FDFA and FG-A perturb):

- ``feedback_at=block`` (default): every basic block's output, after the addition and the ReLU:
  3n blocks; the stem belongs to the first. Output shapes (CIFAR, 32x32): n x (16, 32, 32), then
  n x (32, 16, 16), then n x (64, 8, 8); 28x28 images give 28, 14, 7.
- ``feedback_at=stage``: the output of each stage only (3 blocks of n basic blocks each): three
  feedback tensors instead of 3n, the residual blocks inside a stage trained by backprop from the
  stage's output.

The head (average pool, flatten, linear) always gets its exact gradient. Any number of input
channels (1 for MNIST) and any image of at least 4x4 pixels.

Forward-mode tangents: the basic block has a closed form (``forward_with_tangent``): the
shortcut is linear and the addition sums the tangents of the two branches, each made of the
closed forms of conv, BatchNorm and ReLU (fdfa/tangents.py), so a tangent costs about one more
forward pass, as on the plain CNNs.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from fdfa.models import BlockNet
from fdfa.tangents import residual_with_tangent

WIDTHS = (16, 32, 64)  # channels of the three stages (He et al. 2016, section 4.2)


def conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride, padding=1, bias=False)


class PadShortcut(nn.Module):
    """Option A: subsample with ``stride`` and zero-pad the channels to ``c_out`` (a linear map,
    so a tangent goes through the same op)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.extra, self.stride = c_out - c_in, stride

    def forward(self, x):
        x = x[..., :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra))  # channels: third dim from the end

    def forward_with_tangent(self, x, t):
        return self(x), None if t is None else self(t)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, shortcut: str = "A"):
        super().__init__()
        self.conv1 = conv3x3(c_in, c_out, stride)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = conv3x3(c_out, c_out)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU()
        self.shortcut = None  # the identity
        if stride != 1 or c_in != c_out:
            if shortcut == "A":
                self.shortcut = PadShortcut(c_in, c_out, stride)
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
                )

    def branch(self):
        return [self.conv1, self.bn1, self.relu1, self.conv2, self.bn2]

    def forward(self, x):
        y = x
        for layer in self.branch():
            y = layer(y)
        return self.relu2(y + (x if self.shortcut is None else self.shortcut(x)))

    def forward_with_tangent(self, x, t):
        if t is None:
            return self(x), None
        return residual_with_tangent(self.branch(), self.shortcut, x, t, after=self.relu2)


class CifarResNet(BlockNet):
    """ResNet-(6n+2) for small images; see the module docstring for blocks and shortcuts."""

    def __init__(
        self,
        input_shape,
        num_classes: int,
        depth: int = 20,
        shortcut: str = "A",
        feedback_at: str = "block",
    ):
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 8 or depth % 6 != 2:
            raise ValueError(
                f"model.depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, 56, ...), got {depth!r}"
            )
        if shortcut not in ("A", "B"):
            raise ValueError(f"model.shortcut must be A or B, got {shortcut!r}; e.g. A")
        if feedback_at not in ("block", "stage"):
            raise ValueError(f"model.feedback_at must be block or stage, got {feedback_at!r}")
        super().__init__(input_shape, num_classes)
        c, h, w = self.input_shape
        if min(h, w) < 4:
            raise ValueError(f"model=resnet needs images of at least 4x4 pixels, got {h}x{w}")
        self.depth, self.shortcut, self.feedback_at = depth, shortcut, feedback_at
        n = (depth - 2) // 6
        stem = nn.Sequential(conv3x3(c, WIDTHS[0]), nn.BatchNorm2d(WIDTHS[0]), nn.ReLU())
        stages, c_in = [], WIDTHS[0]
        for i, width in enumerate(WIDTHS):
            stage = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                stage.append(BasicBlock(c_in, width, stride, shortcut))
                c_in = width
            stages.append(stage)
        if feedback_at == "block":
            blocks = [b for stage in stages for b in stage]
            blocks[0] = nn.Sequential(stem, blocks[0])
        else:
            blocks = [nn.Sequential(*([stem] if i == 0 else []), *s) for i, s in enumerate(stages)]
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)
        )
        for m in self.modules():  # He et al.'s initialisation (as torchvision's ResNets)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # what lowers the feedback tensors' memory (fdfa.rules.base refuses them past a limit)
        self.feedback_option = "model.feedback_at=stage" if feedback_at == "block" else None
