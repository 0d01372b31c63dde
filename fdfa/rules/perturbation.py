"""The random directions of the forward-mode rules (FDFA, FG-A, FG-W), ``algorithm.perturbation``.

Both kinds have independent entries with mean 0 and variance 1, so E[u u^T] = I and every
estimator built on them (Ĵ = t u^T, d u, (∇L·v) v) stays unbiased:

- ``gaussian``: u ~ N(0, I), the papers' choice.
- ``rademacher``: u_i = +1 or -1 with probability 1/2 each. The fourth moment E[u_i^4] is 1
  instead of 3: an estimate z^T M z (a quadratic form in the directions z, as all of the above
  are) has variance 2|S|_F^2 - (3 - E[u_i^4]) sum_i M_ii^2 (S = (M + M^T) / 2), lower by
  2 sum_i M_ii^2, the terms where a direction meets itself. For FDFA's Ĵ_l this is
  (2 / batch^2) sum_n |J_l,nn|_F^2; as a share of the variance it is of order 1 / (units of a
  block), so large layers gain little. A ±1 costs 1/32 of a generator call, a normal one call.

A step draws every block's directions at once, as views of one flat buffer filled by one
generator call on the step's device (the CPU's or the GPU's default generator, so runs are
reproducible from ``seed`` and checkpoints carry the state); inside a CUDA graph the draw is
replayed fresh each step, with no host synchronisation.
"""

from __future__ import annotations

import math

import torch

from fdfa.checks import one_of

KINDS = ("gaussian", "rademacher")
PERTURBATION = one_of(*KINDS)  # the check of a rule's ``perturbation`` argument
_SIGNS: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def draw(kind: str, shapes, device, dtype) -> list[torch.Tensor]:
    """One tensor of independent directions per shape in ``shapes``, all views of one buffer."""
    sizes = [math.prod(s) for s in shapes]
    total = sum(sizes)
    if kind == "gaussian":
        flat = torch.empty(total, device=device, dtype=dtype).normal_()
    else:
        flat = rademacher(total, device, dtype)
    return [part.view(shape) for part, shape in zip(flat.split(sizes), shapes)]


def rademacher(n: int, device, dtype) -> torch.Tensor:
    """n independent ±1: 64 random bits per int64 (one generator call for the buffer), each byte
    looked up in a table of the 256 sign patterns of 8 bits."""
    words = torch.empty(-(-n // 64), dtype=torch.int64, device=device).random_(-(2**63), None)
    signs = sign_table(torch.device(device), dtype).index_select(0, words.view(torch.uint8).int())
    return signs.view(-1)[:n]


def sign_table(device: torch.device, dtype) -> torch.Tensor:
    """[256, 8]: row b holds +1 where bit i of b is set, -1 where it is not. Built with device
    ops (capturable) and kept, except while a CUDA graph is captured (its memory is the graph's)."""
    key = (device, dtype)
    if key in _SIGNS:
        return _SIGNS[key]
    bits = torch.arange(256, device=device).unsqueeze(1) >> torch.arange(8, device=device)
    table = (bits & 1).to(dtype).mul_(2).sub_(1)
    if device.type != "cuda" or not torch.cuda.is_current_stream_capturing():
        _SIGNS[key] = table
    return table
