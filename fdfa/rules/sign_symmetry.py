"""Sign symmetry (Liao, Leibo & Poggio 2016, "How important is weight symmetry in
backpropagation?"; Moskovitz et al. 2018): FA (fdfa.rules.fa) with B_l taking W_l's signs.

Each step's B_l is built from W_l before the step, with the three magnitudes biotorch names
(biotorch/layers/fa_constructor/linear.py, jsalbert/biotorch; there each layer draws its W and B
with one init, Xavier by default or PyTorch's kaiming_uniform(a = sqrt(5)), and scales by that
init's standard deviation; fdfa keeps PyTorch's default init of W, so the second is used here):

- uSF (uniform):  B = s sign(W), s = 1 / sqrt(3 fan_in), the std of U(-1/sqrt(fan_in),
  1/sqrt(fan_in)), PyTorch's init of W.
- brSF (batchwise random magnitude): B = |M| ∘ sign(W), M ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))
  drawn afresh every step (one generator call for all layers).
- frSF (fixed random magnitude): B = |M| ∘ sign(W), M drawn once (as FA's B) and kept.

sign(0) = 0: a weight that is exactly 0 passes nothing back.
"""

import math

import torch
from torch import nn

from fdfa.rules.backward_path import BackwardPathRule, random_like_init


def init_bound(layer: nn.Module) -> float:
    """1/sqrt(fan_in): the bound of PyTorch's default uniform init of ``layer.weight``."""
    fan_in, _ = nn.init._calculate_fan_in_and_fan_out(layer.weight)
    return 1.0 / math.sqrt(fan_in)


class USF(BackwardPathRule):
    def feedback_matrices(self):
        return [m.weight.detach().sign().mul_(init_bound(m) / math.sqrt(3)) for m in self.layers]


class BRSF(BackwardPathRule):
    def feedback_matrices(self):
        weights = [m.weight.detach() for m in self.layers]
        ref = weights[0]
        flat = torch.rand(sum(w.numel() for w in weights), device=ref.device, dtype=ref.dtype)
        parts = flat.split([w.numel() for w in weights])
        return [
            u.view_as(w).mul_(init_bound(m)).mul_(w.sign())
            for u, w, m in zip(parts, weights, self.layers)
        ]


class FRSF(BackwardPathRule):
    def __init__(self, model):
        super().__init__(model)
        self.feedback_weights = random_like_init(self.layers)
        with torch.no_grad():
            for b in self.feedback_weights:
                b.abs_()

    def feedback_matrices(self):
        pairs = zip(self.layers, self.feedback_weights)
        return [m.weight.detach().sign().mul_(b) for m, b in pairs]
