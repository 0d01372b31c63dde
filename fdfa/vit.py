"""A small Vision Transformer (Dosovitskiy et al. 2021) for 32x32 and 28x28 images on a CPU, as an
fdfa block network: ``model=vit``.

The image is cut into ``patch`` x ``patch`` patches (4: 64 patches of a 32x32 image, 49 of a
28x28 one), each mapped to ``width`` numbers by a linear layer (a strided conv); a learned class
token is prepended (``pool=cls``) and a learned position embedding added. Then ``depth``
pre-norm transformer blocks, each x + Attention(LayerNorm(x)), then x + MLP(LayerNorm(x)) (MLP:
Linear-GELU-Linear, ``mlp_ratio`` x ``width`` hidden units; ``heads`` attention heads of
width / heads each). The head is LayerNorm, then the class token (``pool=cls``) or the mean of
the tokens (``pool=mean``), then a linear output layer.

Hidden blocks: every transformer block's output, the whole residual stream (all tokens), of
shape (tokens, width): tokens = patches + 1 with ``pool=cls``, else patches. The patch embedding
belongs to the first block. The head always gets its exact gradient.

Written here rather than taken from a library (timm, torchvision): no extra dependency, and its
parts must be fdfa blocks, each with a closed-form forward-mode tangent (``forward_with_tangent``):
the residual adds are linear (tangents add), LayerNorm and GELU have closed forms in
fdfa/tangents.py, and attention's is below: with S = q k^T / sqrt(d) and A = softmax(S),
dS = (dq k^T + q dk^T) / sqrt(d), dA = A * (dS - rowsum(A * dS)), d(A v) = dA v + A dv.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fdfa.checks import check_arguments, integer
from fdfa.models import BlockNet
from fdfa.tangents import residual_with_tangent, softmax_tangent


class PatchEmbedding(nn.Module):
    """Patches -> tokens [batch, tokens, width], the class token first (if any), plus positions."""

    def __init__(self, channels: int, width: int, patch: int, patches: int, cls_token: bool):
        super().__init__()
        self.proj = nn.Conv2d(channels, width, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width)) if cls_token else None
        self.position = nn.Parameter(torch.randn(1, patches + int(cls_token), width) * 0.02)

    def _tokens(self, x, bias: bool):
        """The patch projection of x ([..., C, H, W], any leading dims) as [..., patches, width]."""
        lead = x.shape[:-3]
        z = F.conv2d(
            x.reshape(-1, *x.shape[-3:]),
            self.proj.weight,
            self.proj.bias if bias else None,
            stride=self.proj.stride,
        )
        return z.flatten(2).transpose(1, 2).reshape(*lead, -1, z.shape[1])

    def forward(self, x):
        z = self._tokens(x, bias=True)
        if self.cls_token is not None:
            z = torch.cat([self.cls_token.expand(len(x), -1, -1), z], dim=1)
        return z + self.position

    def forward_with_tangent(self, x, t):
        y = self(x)
        if t is None:
            return y, None
        with torch.no_grad():  # linear in x: the projection without its bias; the rest is constant
            z = self._tokens(t, bias=False)
            if self.cls_token is not None:
                z = torch.cat([z.new_zeros(*z.shape[:-2], 1, z.shape[-1]), z], dim=-2)
            return y, z


class SelfAttention(nn.Module):
    """Multi-head self-attention over the tokens (no mask), with its closed-form tangent."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, self.scale = heads, (width // heads) ** -0.5
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def _split(self, z):
        """[..., T, 3W] -> q, k, v of shape [..., heads, T, W / heads]."""
        z = z.unflatten(-1, (3, self.heads, -1)).movedim(-3, 0)  # [3, ..., T, heads, d]
        return z.transpose(-2, -3).unbind(0)

    @staticmethod
    def _merge(o):
        """[..., heads, T, d] -> [..., T, heads * d]."""
        return o.transpose(-2, -3).flatten(-2)

    def forward(self, x):
        q, k, v = self._split(self.qkv(x))
        a = torch.softmax((q @ k.transpose(-1, -2)) * self.scale, dim=-1)
        return self.out(self._merge(a @ v))

    def forward_with_tangent(self, x, t):
        q, k, v = self._split(self.qkv(x))
        a = torch.softmax((q @ k.transpose(-1, -2)) * self.scale, dim=-1)
        y = self.out(self._merge(a @ v))
        if t is None:
            return y, None
        with torch.no_grad():
            q_t, k_t, v_t = self._split(t @ self.qkv.weight.t())
            s_t = (q_t @ k.transpose(-1, -2) + q @ k_t.transpose(-1, -2)) * self.scale
            a_t = softmax_tangent(a, s_t)
            o_t = a_t @ v + a @ v_t
            return y, self._merge(o_t) @ self.out.weight.t()


class TransformerBlock(nn.Module):
    """Pre-norm: x + Attention(LayerNorm(x)), then x + MLP(LayerNorm(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        hidden = mlp_ratio * width
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def forward_with_tangent(self, x, t):
        if t is None:
            return self(x), None
        x, t = residual_with_tangent([self.norm1, self.attn], None, x, t)
        return residual_with_tangent([self.norm2, self.mlp], None, x, t)


class TokenPool(nn.Module):
    """The class token (``cls``: token 0) or the mean token (``mean``) of [..., T, W]: linear."""

    def __init__(self, pool: str):
        super().__init__()
        self.pool = pool

    def forward(self, x):
        return x[..., 0, :] if self.pool == "cls" else x.mean(-2)

    def forward_with_tangent(self, x, t):
        return self(x), None if t is None else self(t)


class ViT(BlockNet):
    """A small Vision Transformer; see the module docstring."""

    @check_arguments(
        "model.",
        patch=integer(1, example=4),
        depth=integer(1, example=6),
        width=integer(1, example=128),
        heads=integer(1, example=4),
        mlp_ratio=integer(1, example=2),
    )
    def __init__(
        self,
        input_shape,
        num_classes: int,
        patch: int = 4,
        depth: int = 6,
        width: int = 128,
        heads: int = 4,
        mlp_ratio: int = 2,
        pool: str = "cls",
    ):
        if width % heads:
            raise ValueError(f"model.width ({width}) must be a multiple of model.heads ({heads})")
        if pool not in ("cls", "mean"):
            raise ValueError(f"model.pool must be cls or mean, got {pool!r}; e.g. cls")
        super().__init__(input_shape, num_classes)
        c, h, w = self.input_shape
        if h % patch or w % patch:
            raise ValueError(
                f"model.patch ({patch}) must divide the image size {h}x{w}; e.g. model.patch=4"
            )
        patches = (h // patch) * (w // patch)
        embed = PatchEmbedding(c, width, patch, patches, cls_token=pool == "cls")
        blocks = [TransformerBlock(width, heads, mlp_ratio) for _ in range(depth)]
        blocks[0] = nn.Sequential(embed, blocks[0])
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Sequential(
            nn.LayerNorm(width), TokenPool(pool), nn.Linear(width, num_classes)
        )
        self.feedback_option = None  # B_l is [classes, tokens, width]: small at these sizes
