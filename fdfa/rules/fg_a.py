"""Activity-perturbed forward gradient, FG-A (Ren et al. 2023, "Scaling Forward Gradient With
Local Losses").

The perturbations are the ones FDFA uses (same pass, same draws, so their variances compare):
every block output h_l gets a fresh u_l in the tangent (u_l ~ N(0, I), or ±1 entries with
``perturbation=rademacher``: fdfa.rules.perturbation), and one forward-mode pass gives
the logits' tangent t = sum_l J_l u_l. With e = dL/dlogits, the directional derivative of the
loss along all perturbations at once is d = sum_n e_n·t_n, and d·u_l is unbiased for dL/dh_l
because the u_l of different blocks (and samples) are independent with E[u u^T] = I. The estimate
is injected at h_l and back-propagated inside block l only (as DFA does with e·B_l); the output
layer gets its exact gradient.

``per_sample`` picks d (both are unbiased where samples do not interact):

- ``true`` (default, Ren et al.): sample n uses its own term d_n = e_n·t_n, so the estimate for
  h_l[n] is d_n·u_l[n] and the other samples' noise stays out. Under BatchNorm in training mode
  the samples interact through the batch statistics; the estimate's mean is then e_n J_nn
  (J_nn = d logits[n] / d h_l[n]), sample n's own paths only: the exact gradient less its
  cross-sample terms, the same approximation DFA and FDFA make (FDFA's Ĵ_l averages J_nn too).
- ``false``: every sample uses the whole d = sum_n d_n (Baydin et al.'s directional derivative of
  the batch loss): unbiased for the exact gradient even with BatchNorm, at about batch-size times
  the variance.

With ``n_directions=k`` the estimate is averaged over k independent directions in one batched
tangent pass.
"""

import torch

from fdfa.checks import boolean, check_arguments
from fdfa.models import hidden_shapes
from fdfa.rules.base import N_DIRECTIONS, LearningRule, StepOutput, draw_block_perturbations
from fdfa.rules.base import perturbed_forward as _perturbed_forward
from fdfa.rules.perturbation import PERTURBATION


class FGA(LearningRule):
    forward_mode = True

    @check_arguments(n_directions=N_DIRECTIONS, per_sample=boolean(), perturbation=PERTURBATION)
    def __init__(
        self, model, n_directions: int = 1, per_sample: bool = True, perturbation: str = "gaussian"
    ):
        super().__init__(model)
        self.n_directions = n_directions
        self.perturbation = perturbation
        self.shapes = hidden_shapes(model)  # h_l's per-sample shapes
        self.per_sample = per_sample

    def draw_perturbations(self, batch_size: int):
        """The step's u_l for every block, one generator call: [k, batch, *h_l.shape[1:]] each."""
        ref = next(self.model.parameters())
        k = self.n_directions
        return draw_block_perturbations(self.perturbation, self.shapes, batch_size, k, ref)

    def perturbed_forward(self, x, us=None):
        """(hs, us, logits, t): us[l] is [k, batch, *h_l.shape[1:]], t is [k, batch, classes]."""
        us = self.draw_perturbations(len(x)) if us is None else us
        return _perturbed_forward(self.model, x, self.n_directions, us)

    def activity_gradients(self, e, t, us):
        """Estimates of dL/dh_l from e = dL/dlogits [batch, classes], the tangents t [k, batch,
        classes] and the perturbations us, averaged over the k directions."""
        d = (t * e).sum(-1)  # [k, batch]: d[i, n] = e_n·t_n along direction i
        if not self.per_sample:
            d = d.sum(1, keepdim=True).expand_as(d)
        k = d.shape[0]
        return [torch.einsum("kn,knd->nd", d, u.flatten(2)).div_(k).view_as(u[0]) for u in us]

    def train_step(self, x, y) -> StepOutput:
        hs, us, logits, t = self.perturbed_forward(x)
        loss = self.loss(logits, y)
        (e,) = torch.autograd.grad(loss, logits, retain_graph=True)
        injected = self.activity_gradients(e, t.detach(), us)
        torch.autograd.backward([logits, *hs], [e, *injected])
        return StepOutput(loss.detach(), logits.detach())
