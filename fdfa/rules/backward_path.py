"""The backward-path family (FA, KP, uSF, brSF, frSF): backprop with W_l^T replaced by B_l^T.

For a weight layer z = W x + b (Linear; Conv is the same with W's convolution), backprop passes
dL/dx = W^T dL/dz down. These rules pass dL/dx = B^T dL/dz instead, with B of W's shape; the
layer's own gradients stay the usual dL/dW = dL/dz x^T and dL/db = sum dL/dz, from the signal
that arrives. Every nn.Linear and nn.Conv1d/2d/3d of the model (blocks, head, anywhere) is
treated so; BatchNorm, activations and pooling keep their true backward.

Mechanism: while the rule's forward pass runs, each weight layer's ``forward`` is shadowed by an
instance attribute that calls a custom autograd Function (the same forward, a backward with B),
and removed right after. The model's modules, parameters and state_dict keys never change, and
outside ``train_step`` (evaluation, the metrics' true gradient) the model is plain backprop.
"""

from __future__ import annotations

import functools
import logging
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from fdfa.rules.base import LearningRule, StepOutput

log = logging.getLogger(__name__)
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def weight_layers(model: nn.Module) -> list[nn.Module]:
    """Every nn.Linear and nn.Conv1d/2d/3d of the model, in module order."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, *CONVS))]
    others = {type(m).__name__ for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    if others:  # its projections are applied functionally, not through their modules' forward
        log.warning("%s keeps W^T in its backward (its projections bypass forward)", others)
    return layers


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, feedback):
        ctx.save_for_backward(x, feedback)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, feedback = ctx.saved_tensors
        need_x, need_w, need_b, _ = ctx.needs_input_grad
        g2 = g.reshape(-1, g.shape[-1])
        gx = g @ feedback if need_x else None
        gw = g2.t() @ x.reshape(-1, x.shape[-1]) if need_w else None
        gb = g2.sum(0) if need_b else None
        return gx, gw, gb, None


class _Conv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, feedback, stride, padding, dilation, groups):
        ctx.save_for_backward(x, feedback)
        ctx.conv = (stride, padding, dilation, groups, bias is not None)
        pad0 = [0] * len(stride)
        return torch.convolution(x, weight, bias, stride, padding, dilation, False, pad0, groups)

    @staticmethod
    def backward(ctx, g):
        x, feedback = ctx.saved_tensors
        stride, padding, dilation, groups, has_bias = ctx.conv
        mask = list(ctx.needs_input_grad[:3])
        bias_sizes = [feedback.shape[0]] if has_bias else None
        pad0 = [0] * len(stride)  # gx is a convolution with B; gw needs only x and g
        gx, gw, gb = torch.ops.aten.convolution_backward(
            g, x, feedback, bias_sizes, stride, padding, dilation, False, pad0, groups, mask
        )
        return gx, gw, gb if has_bias else None, None, None, None, None, None


def _forward(layer: nn.Module, feedback: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return _Linear.apply(x, layer.weight, layer.bias, feedback)
    padding = layer.padding
    if layer.padding_mode != "zeros" or isinstance(padding, str):  # pad as the module does
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        x = F.pad(x, layer._reversed_padding_repeated_twice, mode=mode)
        padding = (0,) * len(layer.stride)
    args = (layer.stride, padding, layer.dilation, layer.groups)
    return _Conv.apply(x, layer.weight, layer.bias, feedback, *args)


@contextmanager
def backward_through(layers, feedbacks):
    """Inside this block, each layer's backward passes B^T dL/dz down (B from ``feedbacks``)."""
    for layer, b in zip(layers, feedbacks):
        layer.forward = functools.partial(_forward, layer, b)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


class BackwardPathRule(LearningRule):
    """Base of FA, KP and the sign rules: ``feedback_matrices()`` gives this step's B_l, one per
    weight layer (``self.layers``); the step is backprop through them."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.layers = weight_layers(model)  # a plain list: the modules stay the model's alone

    def feedback_matrices(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def feedback_pairs(self) -> list[tuple[nn.Module, torch.Tensor]]:
        """(layer, B) per weight layer, for the metrics' feedback/<layer>/cos (B against W)."""
        return list(zip(self.layers, self.feedback_matrices()))

    def train_step(self, x, y) -> StepOutput:
        with backward_through(self.layers, self.feedback_matrices()):
            logits = self.model(x)
        loss = self.loss(logits, y)
        loss.backward()
        return StepOutput(loss.detach(), logits.detach())


def random_like_init(layers) -> nn.ParameterList:
    """One fixed B per layer, drawn as PyTorch's default init draws W: U(-1/sqrt(fan_in),
    1/sqrt(fan_in)) (kaiming_uniform with a = sqrt(5)); not trained by autograd."""
    bs = []
    for layer in layers:
        b = torch.empty_like(layer.weight, requires_grad=False)
        nn.init.kaiming_uniform_(b, a=5**0.5)
        bs.append(nn.Parameter(b, requires_grad=False))
    return nn.ParameterList(bs)
