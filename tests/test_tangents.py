"""The closed-form tangents equal torch's forward-mode AD, layer type by layer type."""

import copy

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from fdfa.models import AlexNet, FCNet, ShallowCNN
from fdfa.tangents import forward_with_tangent


def reference_jvp(module, x, t):
    """torch.autograd.forward_ad on a copy (running statistics move once, as in the real call)."""
    m = copy.deepcopy(module)
    with fwAD.dual_level():
        primal, tangent = fwAD.unpack_dual(m(fwAD.make_dual(x, t)))
    return primal, tangent, m


BLOCKS = {
    "linear-bn1d-relu": (
        lambda: nn.Sequential(nn.Linear(12, 9), nn.BatchNorm1d(9), nn.ReLU()),
        (12,),
    ),
    "conv-bn2d-relu-pool": (
        lambda: nn.Sequential(
            nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(), nn.MaxPool2d(3, 2)
        ),
        (3, 11, 11),
    ),
    "flatten-avgpool-tanh-sigmoid": (
        lambda: nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Tanh(), nn.Sigmoid()),
        (4, 6, 6),
    ),
    "fallback-layernorm-gelu": (lambda: nn.Sequential(nn.LayerNorm(7), nn.GELU()), (7,)),
}


@pytest.mark.parametrize("name", BLOCKS)
@pytest.mark.parametrize("train_mode", [True, False])
def test_single_direction_matches_forward_ad(name, train_mode):
    torch.manual_seed(0)
    make, shape = BLOCKS[name]
    block = make().train(train_mode)
    for m in block.modules():  # non-trivial affine parameters and running statistics
        if isinstance(m, nn.modules.batchnorm._BatchNorm | nn.LayerNorm):
            nn.init.normal_(m.weight, 1, 0.3), nn.init.normal_(m.bias, 0, 0.3)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_var.uniform_(0.5, 2), m.running_mean.normal_()
    x = torch.randn(6, *shape)
    t = torch.randn(6, *shape)
    ref_y, ref_t, ref_module = reference_jvp(block, x, t)
    y, tangent = forward_with_tangent(block, x, t)
    torch.testing.assert_close(y, ref_y)
    torch.testing.assert_close(tangent, ref_t, rtol=1e-4, atol=1e-5)
    for a, b in zip(block.buffers(), ref_module.buffers()):  # running stats moved exactly once
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", BLOCKS)
def test_stacked_directions_match_one_at_a_time(name):
    torch.manual_seed(1)
    make, shape = BLOCKS[name]
    block = make().train()
    x = torch.randn(5, *shape)
    ts = torch.randn(3, 5, *shape)
    refs = [reference_jvp(block, x, ts[k])[1] for k in range(3)]
    stepped_once = copy.deepcopy(block)
    stepped_once(x)
    y, tangents = forward_with_tangent(block, x, ts)
    assert tangents.shape == ts.shape[:2] + y.shape[1:]
    for k in range(3):
        torch.testing.assert_close(tangents[k], refs[k], rtol=1e-4, atol=1e-5)
    for a, b in zip(block.buffers(), stepped_once.buffers()):  # running stats moved once, not 3x
        torch.testing.assert_close(a, b)


def test_primal_graph_is_recorded_and_tangent_is_not():
    block = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU())
    y, t = forward_with_tangent(block, torch.randn(8, 4), torch.randn(8, 4))
    assert y.requires_grad and not t.requires_grad
    y.sum().backward()
    assert block[0].weight.grad is not None


@pytest.mark.parametrize(
    "net, shape",
    [
        (lambda: FCNet((1, 8, 8), 10, width=16), (1, 8, 8)),
        (lambda: ShallowCNN((1, 16, 16), 10, channels=(4, 6), kernel_size=3), (1, 16, 16)),
        (lambda: AlexNet((3, 64, 64), 10, fc_width=32), (3, 64, 64)),
    ],
    ids=["fc", "cnn", "alexnet"],
)
def test_every_block_of_the_shipped_nets(net, shape):
    torch.manual_seed(2)
    model = net()
    h = torch.randn(4, *shape)
    for block in model.blocks:
        t = torch.randn_like(h)
        _, ref_t, _ = reference_jvp(block, h, t)
        y, tangent = forward_with_tangent(copy.deepcopy(block), h, t)
        torch.testing.assert_close(tangent, ref_t, rtol=1e-4, atol=1e-5)
        h = y.detach()
