"""Forward Direct Feedback Alignment (Bacho & Chu 2024).

One forward pass carries, besides the primal, a forward-mode tangent: at every block output h_l an
independent perturbation u_l is added to the tangent (u_l ~ N(0, I), or ±1 entries with
``perturbation=rademacher``: fdfa.rules.perturbation), so the logits' tangent is
t = sum_l J_l u_l, with J_l the Jacobian of the logits w.r.t. h_l. Since E[u_l u_k^T] = I if l == k
else 0, the per-batch estimate  Ĵ_l = mean_batch(t ⊗ u_l) = t^T u_l / batch  is unbiased for the
batch-averaged J_l. With ``n_directions=k`` the step averages Ĵ_l over k independent directions
(one batched tangent pass). A momentum average of Ĵ_l is the DFA feedback B_l:

- ``feedback_update=ema``:  B_l <- momentum * B_l + (1 - momentum) * Ĵ_l
- ``feedback_update=adam``: Adam at ``feedback_lr`` on the gradient B_l - Ĵ_l (the reference code)

B_l starts at 0 (``feedback_init=zeros``, the paper) or kaiming-uniform (``feedback_init=kaiming``,
DFA's start). The hidden weights are then trained as in DFA with the B_l of before this step's
update (the reference code's order).

Under torchrun (fdfa/distributed.py) every rank draws its own directions on its own shard and the
update uses the mean over the N ranks of their Ĵ_l (Adam: of B_l - Ĵ_l; EMA: of the updated B_l,
the same since the update is linear in Ĵ_l): independent estimates, so 1/N of the variance.
"""

import torch

from fdfa.checks import check_arguments, fraction, one_of
from fdfa.distributed import average_, average_gradients
from fdfa.rules.base import (
    FEEDBACK_DECAY,
    FEEDBACK_INIT,
    FEEDBACK_LR,
    N_DIRECTIONS,
    DirectFeedbackRule,
    FeedbackAdam,
    StepOutput,
    draw_block_perturbations,
    dual_forward,
    own_precision,
    perturbed_forward,
)
from fdfa.rules.perturbation import PERTURBATION


class FDFA(DirectFeedbackRule):
    forward_mode = True

    @check_arguments(
        feedback_update=one_of("adam", "ema"), momentum=fraction(0.99), feedback_lr=FEEDBACK_LR,
        feedback_decay=FEEDBACK_DECAY, feedback_init=FEEDBACK_INIT, n_directions=N_DIRECTIONS,
        perturbation=PERTURBATION,
    )  # fmt: skip
    def __init__(
        self,
        model,
        feedback_update: str = "adam",
        momentum: float = 0.99,
        feedback_lr: float = 1e-4,
        feedback_decay: float = 0.0,
        feedback_init: str = "zeros",
        n_directions: int = 1,
        perturbation: str = "gaussian",
    ):
        super().__init__(model, init=feedback_init)
        self.feedback_update = feedback_update
        self.momentum = float(momentum)
        self.feedback_decay = float(feedback_decay)
        self.n_directions = n_directions
        self.perturbation = perturbation
        self.shapes = [tuple(b.shape[1:]) for b in self.feedback]  # h_l's per-sample shapes
        self.feedback_optimizer = None
        if feedback_update == "adam":
            self.feedback_optimizer = FeedbackAdam(
                self.feedback.parameters(), lr=feedback_lr, weight_decay=feedback_decay
            )

    def draw_perturbations(self, batch_size: int):
        """The step's u_l for every block, one generator call: [batch, *h_l] each, or
        [k, batch, *h_l] with k = n_directions > 1."""
        k = None if self.n_directions == 1 else self.n_directions
        ref = self.feedback[0]
        return draw_block_perturbations(self.perturbation, self.shapes, batch_size, k, ref)

    def dual_forward(self, x):
        """One direction: (block outputs, perturbations, logits, logits' tangent [batch, C])."""
        return dual_forward(self.model, x, self.draw_perturbations(len(x)))

    @staticmethod
    def jacobian_estimates(t, us):
        """Ĵ_l = t^T u_l / batch, one matmul per block (never the [batch, classes, D] product).

        For k directions pass t and u_l with the direction folded into the batch dimension
        ([k * batch, ...]): the result is then the mean of the k per-direction estimates."""
        n = t.shape[0]
        return [(t.t() @ u.flatten(1)).div_(n).view(t.shape[1], *u.shape[1:]) for u in us]

    def train_step(self, x, y) -> StepOutput:
        if self.n_directions == 1:
            hs, us, logits, t = self.dual_forward(x)
        else:
            us = self.draw_perturbations(len(x))
            hs, us, logits, t = perturbed_forward(self.model, x, self.n_directions, us)
            t, us = t.flatten(0, 1), [u.flatten(0, 1) for u in us]
        loss = self.loss(logits, y)
        self.inject_and_backward(hs, logits, loss)
        with own_precision(x.device):  # B_l's update in B_l's dtype, also under autocast
            self.update_feedback(t.detach().to(self.feedback[0].dtype), us)
        return StepOutput(loss.detach(), logits.detach())

    @torch.no_grad()
    def update_feedback(self, t, us):
        """Fold this step's Ĵ_l = t^T u_l / batch into B_l, one GEMM per block: the EMA as
        B_l <- momentum B_l + (1 - momentum) Ĵ_l in place, Adam's gradient as B_l - Ĵ_l."""
        n, tt = t.shape[0], t.t()
        for b, u in zip(self.feedback, us):
            b_flat = b.view(b.shape[0], -1)
            if self.feedback_update == "ema":
                if self.feedback_decay:
                    b.mul_(1 - self.feedback_decay)
                b_flat.addmm_(tt, u.flatten(1), beta=self.momentum, alpha=(1 - self.momentum) / n)
            else:
                b.grad = torch.addmm(b_flat, tt, u.flatten(1), alpha=-1.0 / n).view_as(b)
        if self.feedback_update == "adam":
            average_gradients(self.feedback)  # under torchrun: the ranks' mean B_l - Ĵ_l
            self.feedback_optimizer.update()
        else:
            average_(self.feedback)  # under torchrun: B_l from the ranks' mean Ĵ_l
