"""Weight-perturbed forward gradient, FG-W (Baydin et al. 2022, "Gradients without Backprop").

Draw v ~ N(0, I) shaped like every parameter (or ±1 entries with ``perturbation=rademacher``:
fdfa.rules.perturbation); one forward-mode pass gives the directional derivative d = ∇L·v of the
batch-mean loss, and d·v is an unbiased estimate of ∇L (since E[v v^T] = I). Its squared error
has mean (P + 1)|∇L|^2 for Gaussian v and (P - 1)|∇L|^2 for ±1 (|v|^2 = P exactly), P parameters.
With ``n_directions=k`` the step averages d_i·v_i over k independent directions,
computed in one batched tangent pass (``vmap`` over ``jvp``; memory grows with k x parameters).

Every parameter is perturbed, the output layer and BatchNorm's affine parameters included: that is
Baydin et al.'s method, and it keeps FG-W a rule with no reverse-mode pass at all, the pure
weight-perturbation end of the comparison (FG-A and FDFA give the head its exact gradient).

BatchNorm: the pass runs in the model's mode, so in training it normalises with the batch's
statistics and updates the running buffers exactly once per step, as a plain training forward;
buffers are never perturbed.
"""

import torch
import torch.autograd.forward_ad as fwAD
from torch.func import functional_call, jvp, vmap

from fdfa.checks import check_arguments
from fdfa.rules.base import (
    N_DIRECTIONS,
    LearningRule,
    StepOutput,
    batch_statistics_only,
    own_precision,
)
from fdfa.rules.perturbation import PERTURBATION, draw


class FGW(LearningRule):
    forward_mode = True

    @check_arguments(n_directions=N_DIRECTIONS, perturbation=PERTURBATION)
    def __init__(self, model, n_directions: int = 1, perturbation: str = "gaussian"):
        super().__init__(model)
        self.n_directions = n_directions
        self.perturbation = perturbation

    def draw_directions(self) -> dict[str, torch.Tensor]:
        """v per parameter, stacked over the k directions: name -> [k, *p.shape]; one generator
        call for all of them."""
        named = list(self.model.named_parameters())
        p = named[0][1]
        shapes = [(self.n_directions, *q.shape) for _, q in named]
        vs = draw(self.perturbation, shapes, p.device, p.dtype)
        return {name: v for (name, _), v in zip(named, vs)}

    def draw_perturbations(self, batch_size: int | None = None):
        """The step's draws (``draw_directions``; the bench times them)."""
        return self.draw_directions()

    def directional_derivatives(self, x, y, directions):
        """d_i = ∇L·v_i for each stacked direction v_i (``directions``: name -> [k, *shape]).

        Returns (loss, logits, d of shape [k]); updates BatchNorm buffers once (a training forward).
        One direction: one dual-tensor pass. k > 1: a plain forward (loss, logits, buffers) and one
        ``vmap``-ed ``jvp`` for the k tangents, which leaves the buffers alone."""
        params = {name: p.detach() for name, p in self.model.named_parameters()}
        k = next(iter(directions.values())).shape[0]
        with torch.no_grad():
            if k == 1:
                with fwAD.dual_level():
                    duals = {n: fwAD.make_dual(p, directions[n][0]) for n, p in params.items()}
                    logits = functional_call(self.model, duals, (x,))
                    loss, d = fwAD.unpack_dual(self.loss(logits, y))
                    logits = fwAD.unpack_dual(logits).primal
                return loss, logits, d.reshape(1)
            logits = self.model(x)
            loss = self.loss(logits, y)

            def loss_given(p):
                return self.loss(functional_call(self.model, p, (x,)), y)

            with batch_statistics_only(self.model):
                d = vmap(lambda v: jvp(loss_given, (params,), (v,))[1])(directions)
        return loss, logits, d

    def train_step(self, x, y) -> StepOutput:
        directions = self.draw_directions()
        loss, logits, d = self.directional_derivatives(x, y, directions)
        with own_precision(x.device):  # in the parameters' dtype, also under autocast
            for name, p in self.model.named_parameters():
                v = directions[name].flatten(1)
                estimate = (d.to(v.dtype) @ v).div_(len(d)).view_as(p)  # mean_i d_i v_i
                p.grad = estimate if p.grad is None else p.grad + estimate  # accumulates
        return StepOutput(loss.detach(), logits.detach())
