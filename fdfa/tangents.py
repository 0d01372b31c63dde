"""Forward-mode tangents through a block, module by module, at the cost of plain tensor ops.

``forward_with_tangent(module, x, t)`` returns ``(module(x), J t)``: the primal is computed (and
recorded by autograd) exactly as ``module(x)``; the tangent ``J t`` (J: the module's Jacobian at x)
is computed without autograd, by the closed-form rule of each layer type. This is what
``torch.autograd.forward_ad`` computes, but BatchNorm's generic forward-mode formula costs several
times a plain forward on the CPU, while its closed form below costs about one.

``t`` has the shape of ``x``, or ``[k, *x.shape]`` for k directions at once. A module that defines
its own ``forward_with_tangent(x, t)`` method (fdfa's residual and transformer blocks) is run by it;
other types get a rule of ``_RULES`` (``register_tangent_rule`` adds one, e.g. fdfa.adapter's for
torchvision's residual blocks) or fall back to ``torch.autograd.forward_ad`` (one direction at a
time, and the module's forward once per direction).
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn


def _private_op(owner, name: str):
    """A private torch op, or None where this torch lacks it (then the public path runs)."""
    try:
        return getattr(owner, name)
    except (AttributeError, RuntimeError):
        return None


# BatchNorm's own kernels (cuDNN on a GPU) and ReLU's backward: one fused kernel each.
_bn_forward = _private_op(torch, "_batch_norm_impl_index")
_bn_backward = _private_op(torch.ops.aten, "_batch_norm_impl_index_backward")
_threshold_backward = _private_op(torch.ops.aten, "threshold_backward")
# LayerNorm's statistics and input backward, GELU's and softmax's backward: each one fused kernel
# where the closed forms below take several elementwise passes (and torch.var a slow one).
_ln_stats = _private_op(torch, "native_layer_norm")
_ln_backward = _private_op(torch.ops.aten, "native_layer_norm_backward")
_gelu_backward = _private_op(torch.ops.aten, "gelu_backward")
_softmax_backward = _private_op(torch.ops.aten, "_softmax_backward_data")


def forward_with_tangent(module: nn.Module, x: torch.Tensor, t: torch.Tensor | None):
    if t is None:
        return module(x), None
    if isinstance(module, nn.Sequential):
        for layer in module:
            x, t = forward_with_tangent(layer, x, t)
        return x, t
    own = getattr(module, "forward_with_tangent", None)
    if own is not None:
        return own(x, t)
    rule = _RULES.get(type(module))
    if rule is None:
        return _fallback(module, x, t)
    y, tangent = rule(module, x, t)
    return y, tangent


def register_tangent_rule(module_type: type, rule) -> None:
    """Use ``rule(module, x, t) -> (module(x), J t)`` for modules of exactly ``module_type``."""
    _RULES[module_type] = rule


def residual_with_tangent(main, shortcut, x, t, after=None):
    """``after(main(x) + shortcut(x))`` and its tangent: the add is linear, so its tangent is the
    sum of the branches' tangents, each from its own closed forms. ``main``: a module or a list
    of modules run in order; ``shortcut`` None is the identity; ``after`` None is nothing."""
    y, y_t = x, t
    for layer in main if isinstance(main, (list, tuple)) else [main]:
        y, y_t = forward_with_tangent(layer, y, y_t)
    s, s_t = (x, t) if shortcut is None else forward_with_tangent(shortcut, x, t)
    out = y + s
    with torch.no_grad():
        out_t = y_t + s_t
    return (out, out_t) if after is None else forward_with_tangent(after, out, out_t)


def _stacked(x, t) -> bool:
    return t.dim() == x.dim() + 1


def _per_sample(fn, x, t):
    """Apply a linear op ``fn`` (written for a batch) to t, stacked directions included."""
    if _stacked(x, t):
        k, n = t.shape[:2]
        return fn(t.flatten(0, 1)).unflatten(0, (k, n))
    return fn(t)


def _linear(m: nn.Linear, x, t):
    y = m(x)
    with torch.no_grad():
        return y, t @ m.weight.t()


def _conv(m: nn.Conv2d, x, t):
    if m.padding_mode != "zeros":
        return _fallback(m, x, t)
    y = m(x)
    with torch.no_grad():
        conv = lambda v: F.conv2d(v, m.weight, None, m.stride, m.padding, m.dilation, m.groups)
        return y, _per_sample(conv, x, t)


def _batch_norm(m: nn.modules.batchnorm._BatchNorm, x, t):
    shape = [1, -1] + [1] * (x.dim() - 2)  # broadcast per channel
    if not m.training and m.running_var is not None:  # running statistics: a per-channel scale
        y = m(x)
        with torch.no_grad():
            scale = torch.rsqrt(m.running_var + m.eps) * (m.weight if m.affine else 1.0)
            return y, t * scale.view(shape)
    if _bn_forward is None or _bn_backward is None:
        return _batch_norm_public(m, x, t, shape)
    # Batch statistics, as the module's forward: the same op (cuDNN's kernel on a GPU, the native
    # one on the CPU) and the same running-statistics update, keeping the batch mean and 1/std.
    momentum = 0.0
    if m.training and m.track_running_stats and m.num_batches_tracked is not None:
        m.num_batches_tracked.add_(1)
        momentum = 1.0 / float(m.num_batches_tracked) if m.momentum is None else m.momentum
    y, mean, inv_std, reserve, impl = _bn_forward(
        x,
        m.weight,
        m.bias,
        m.running_mean,
        m.running_var,
        True,
        momentum,
        m.eps,
        torch.backends.cudnn.enabled,
    )
    with torch.no_grad():
        if not _stacked(x, t):
            # BatchNorm's input Jacobian in training mode is self-adjoint, so J t is the backward
            # kernel of the same implementation applied to t:
            # (t - mean(t) - x_hat * mean(x_hat * t)) * gamma / std
            only_input = [True, False, False]
            return y, _bn_backward(
                impl,
                x.detach(),
                t,
                m.weight,
                m.running_mean,
                m.running_var,
                mean,
                inv_std,
                True,
                m.eps,
                only_input,
                reserve,
            )[0]
        return y, _batch_norm_tangent(m, x, t, mean, inv_std, shape)


def _batch_norm_public(m, x, t, shape):
    """Batch statistics with public ops only: the module's forward (which updates the running
    statistics), the batch mean and 1/std recomputed, and the closed-form tangent."""
    y = m(x)
    with torch.no_grad():
        dims = [0] + list(range(2, x.dim()))
        xd = x.detach()
        mean = xd.mean(dims)
        inv_std = torch.rsqrt(xd.var(dims, unbiased=False) + m.eps)
        return y, _batch_norm_tangent(m, x, t, mean, inv_std, shape)


def _batch_norm_tangent(m, x, t, mean, inv_std, shape):
    """(t - mean(t) - x_hat * mean(x_hat * t)) * gamma / std, per direction when stacked."""
    offset = 1 if _stacked(x, t) else 0
    dims = [d + offset for d in [0] + list(range(2, x.dim()))]  # per direction: batch (+ space)
    x_hat = (x.detach() - mean.view(shape)) * inv_std.view(shape)
    centre = torch.addcmul(t.mean(dims, keepdim=True), x_hat, (x_hat * t).mean(dims, keepdim=True))
    scale = inv_std * m.weight if m.affine else inv_std
    return (t - centre).mul_(scale.view(shape))


def _relu(m, x, t):
    y = m(x)
    with torch.no_grad():  # t where y > 0, else 0: one fused kernel
        if _threshold_backward is None:
            return y, t * (y.detach() > 0)
        return y, _threshold_backward(t, y.detach(), 0)


def _tanh(m, x, t):
    y = m(x)
    with torch.no_grad():
        return y, t * (1 - y.detach() ** 2)


def _sigmoid(m, x, t):
    y = m(x)
    with torch.no_grad():
        s = y.detach()
        return y, t * (s * (1 - s))


def _max_pool(m: nn.MaxPool2d, x, t):
    y, idx = F.max_pool2d(x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, True)
    with torch.no_grad():
        idx = idx.flatten(2)
        if _stacked(x, t):
            idx = idx.expand(t.shape[0], *idx.shape)
        picked = t.flatten(-2).gather(-1, idx)
        return y, picked.view(*t.shape[:-2], *y.shape[-2:])


def _layer_norm(m: nn.LayerNorm, x, t):
    """Per sample (and token), over the normalised dims: the same closed form as BatchNorm's,
    (t - mean(t) - x_hat * mean(x_hat * t)) * gamma / std. Without gamma the input Jacobian is
    symmetric, so LayerNorm's own backward kernel (gamma left out) applied to t gives it."""
    y = m(x)
    with torch.no_grad():
        dims = tuple(range(-len(m.normalized_shape), 0))
        xd = x.detach()
        if _ln_stats is not None:  # mean and 1/std from LayerNorm's kernel (torch.var is slow)
            _, mean, inv_std = _ln_stats(xd, m.normalized_shape, None, None, m.eps)
        else:
            mean = xd.mean(dims, keepdim=True)
            inv_std = torch.rsqrt(xd.var(dims, unbiased=False, keepdim=True) + m.eps)
        if _ln_stats is not None and _ln_backward is not None and t.shape == x.shape:
            only_input = [True, False, False]
            tangent = _ln_backward(
                t.to(xd.dtype), xd, m.normalized_shape, mean, inv_std, None, None, only_input
            )[0].to(t.dtype)
        else:
            x_hat = (xd - mean) * inv_std
            centre = torch.addcmul(
                t.mean(dims, keepdim=True), x_hat, (x_hat * t).mean(dims, keepdim=True)
            )
            tangent = (t - centre).mul_(inv_std)
        return y, tangent.mul_(m.weight) if m.weight is not None else tangent


def _gelu(m: nn.GELU, x, t):
    if m.approximate != "none":
        return _fallback(m, x, t)
    y = m(x)
    with torch.no_grad():  # GELU'(x) = Phi(x) + x phi(x)
        xd = x.detach()
        if _gelu_backward is not None and t.shape == x.shape and t.dtype == x.dtype:
            return y, _gelu_backward(t, xd)  # t * GELU'(x), one kernel
        slope = torch.special.ndtr(xd) + xd * torch.exp(-0.5 * xd * xd) * (2 * torch.pi) ** -0.5
        return y, t * slope


def softmax_tangent(a: torch.Tensor, s_t: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The tangent a * (s_t - sum(a * s_t)) of a = softmax(s) along s_t (a: the output; s_t
    may carry stacked directions in front): softmax's own backward kernel, which computes the
    same (its Jacobian is symmetric)."""
    if _softmax_backward is not None and s_t.dtype == a.dtype:
        return _softmax_backward(s_t, a.detach().expand_as(s_t), dim, a.dtype)
    return a * (s_t - (a * s_t).sum(dim, keepdim=True))


def _dropout(m: nn.Dropout, x, t):
    """One mask for the primal and every direction (the fallback would draw one per direction)."""
    if not m.training or m.p == 0:
        return m(x), t
    if m.p >= 1:
        return m(x), torch.zeros_like(t)
    mask = torch.empty_like(x, requires_grad=False).bernoulli_(1 - m.p).div_(1 - m.p)
    y = x * mask
    with torch.no_grad():
        return y, t * mask


def _linear_module(m, x, t):
    """Modules that are linear maps of their input: the tangent goes through the same op."""
    y = m(x)
    with torch.no_grad():
        return y, _per_sample(m, x, t)


def _fallback(m, x, t):
    """Any other module: torch's forward-mode AD, one direction per pass. Passes after the first
    restore the module's buffers (e.g. running statistics), so its state changes as in one call."""
    directions = t.unbind(0) if _stacked(x, t) else [t]
    tangents = []
    for i, direction in enumerate(directions):
        saved = {n: b.clone() for n, b in m.named_buffers()} if i else {}
        with fwAD.dual_level(), torch.set_grad_enabled(i == 0 and torch.is_grad_enabled()):
            primal, tangent = fwAD.unpack_dual(
                m(fwAD.make_dual(x if i == 0 else x.detach(), direction))
            )
        for name, value in saved.items():
            m.get_buffer(name).copy_(value)
        if i == 0:
            y = primal
        tangents.append(torch.zeros_like(primal) if tangent is None else tangent.detach())
    return y, (torch.stack(tangents) if _stacked(x, t) else tangents[0])


_RULES = {
    nn.Linear: _linear,
    nn.Conv2d: _conv,
    nn.BatchNorm1d: _batch_norm,
    nn.BatchNorm2d: _batch_norm,
    nn.ReLU: _relu,
    nn.Tanh: _tanh,
    nn.Sigmoid: _sigmoid,
    nn.MaxPool2d: _max_pool,
    nn.Flatten: _linear_module,
    nn.AdaptiveAvgPool2d: _linear_module,
    nn.AvgPool2d: _linear_module,
    nn.Identity: _linear_module,
    nn.LayerNorm: _layer_norm,
    nn.GELU: _gelu,
    nn.Dropout: _dropout,
}
