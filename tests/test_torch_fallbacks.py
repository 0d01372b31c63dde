"""A torch without the private ops fdfa uses for speed still trains correctly: with each op
removed, the public fallback gives the same numbers (fdfa/tangents.py, FeedbackAdam)."""

import copy

import pytest
import torch
from torch import nn

from fdfa import tangents
from fdfa.rules.base import FeedbackAdam
from fdfa.vit import TransformerBlock

BLOCKS = {  # a block and the shape of one sample
    "linear": (lambda: nn.Sequential(nn.Linear(12, 9), nn.BatchNorm1d(9), nn.ReLU()), (12,)),
    "conv": (
        lambda: nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU()),
        (3, 6, 6),
    ),
    "transformer": (lambda: TransformerBlock(width=8, heads=2, mlp_ratio=2), (5, 8)),
}
PRIVATE_OPS = (
    "_bn_forward",
    "_bn_backward",
    "_threshold_backward",
    "_ln_stats",
    "_ln_backward",
    "_gelu_backward",
    "_softmax_backward",
)


@pytest.mark.parametrize("kind", BLOCKS)
@pytest.mark.parametrize("directions", [None, 3])  # one tangent, or 3 stacked
def test_public_tangent_path_agrees_with_the_private_ops(monkeypatch, kind, directions):
    torch.manual_seed(0)
    make, shape = BLOCKS[kind]
    fast = make().train()
    for m in fast.modules():
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d | nn.LayerNorm):
            nn.init.normal_(m.weight, 1, 0.3), nn.init.normal_(m.bias, 0, 0.3)
    public = copy.deepcopy(fast)
    x = torch.randn(8, *shape)
    t = torch.randn(*(() if directions is None else (directions,)), *x.shape)
    for _ in range(2):  # twice: running statistics move the same way each call
        y, tangent = tangents.forward_with_tangent(fast, x, t)
        with monkeypatch.context() as m:
            for name in PRIVATE_OPS:
                assert hasattr(tangents, name)
                m.setattr(tangents, name, None)  # as on a torch that lacks them
            y_pub, tangent_pub = tangents.forward_with_tangent(public, x, t)
        torch.testing.assert_close(y_pub, y)
        torch.testing.assert_close(tangent_pub, tangent, rtol=1e-4, atol=1e-5)
        for a, b in zip(public.buffers(), fast.buffers()):
            torch.testing.assert_close(a, b)


def test_feedback_adam_without_the_fused_kernel_is_plain_adam(monkeypatch):
    torch.manual_seed(0)
    start = [torch.randn(4, 5), torch.randn(4, 3)]
    fast_params = [nn.Parameter(p.clone(), requires_grad=False) for p in start]
    plain_params = [nn.Parameter(p.clone(), requires_grad=False) for p in start]
    fast = FeedbackAdam(fast_params, lr=1e-2, weight_decay=1e-3)
    with monkeypatch.context() as m:
        m.delattr(torch, "_fused_adam_")
        plain = FeedbackAdam(plain_params, lr=1e-2, weight_decay=1e-3)
    assert fast.fused_kernel is not None and plain.fused_kernel is None
    for _ in range(5):
        grads = [torch.randn_like(p) for p in start]
        for params in (fast_params, plain_params):
            for p, g in zip(params, grads):
                p.grad = g.clone()
        fast.update()
        plain.update()
    for a, b in zip(plain_params, fast_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert not torch.equal(plain_params[0], start[0])  # it did update
    assert plain.state_dict()["state"][0]["step"].item() == 5
