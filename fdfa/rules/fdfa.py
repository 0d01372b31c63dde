"""Forward Direct Feedback Alignment (Bacho & Chu 2024).

One forward pass carries, besides the primal, a forward-mode tangent: at every block output h_l an
independent perturbation u_l ~ N(0, I) is added to the tangent, so the logits' tangent is
t = sum_l J_l u_l, with J_l the Jacobian of the logits w.r.t. h_l. Since E[u_l u_k^T] = I if l == k
else 0, the per-batch estimate  Ĵ_l = mean_batch(t ⊗ u_l) = t^T u_l / batch  is unbiased for the
batch-averaged J_l. A momentum average of Ĵ_l is the DFA feedback B_l:

- ``feedback_update=ema``:  B_l <- momentum * B_l + (1 - momentum) * Ĵ_l
- ``feedback_update=adam``: Adam at ``feedback_lr`` on the gradient B_l - Ĵ_l (the reference code)

B_l starts at 0. The hidden weights are then trained as in DFA with the B_l of before this step's
update (the reference code's order).
"""

import torch
import torch.autograd.forward_ad as fwAD

from fdfa.rules.base import DirectFeedbackRule, StepOutput


class FDFA(DirectFeedbackRule):
    def __init__(
        self,
        model,
        feedback_update: str = "adam",
        momentum: float = 0.99,
        feedback_lr: float = 1e-4,
        feedback_decay: float = 0.0,
    ):
        super().__init__(model, init="zeros")
        if feedback_update not in ("ema", "adam"):
            raise ValueError(f"feedback_update must be 'ema' or 'adam', got {feedback_update!r}")
        self.feedback_update = feedback_update
        self.momentum = float(momentum)
        self.feedback_decay = float(feedback_decay)
        self.feedback_optimizer = None
        if feedback_update == "adam":
            self.feedback_optimizer = torch.optim.Adam(
                self.feedback.parameters(), lr=feedback_lr, weight_decay=feedback_decay
            )

    def dual_forward(self, x):
        """Forward with tangents. Returns (block outputs, perturbations, logits, logits' tangent).

        Block inputs are detached from the reverse-mode graph (local training), not from the
        tangent, which flows through the whole net."""
        hs, us = [], []
        h, tangent = x, None
        with fwAD.dual_level():
            for block in self.model.blocks:
                inp = h.detach() if tangent is None else fwAD.make_dual(h.detach(), tangent)
                h, h_tangent = fwAD.unpack_dual(block(inp))
                u = torch.randn_like(h)
                tangent = u if h_tangent is None else h_tangent + u
                hs.append(h)
                us.append(u)
            logits, t = fwAD.unpack_dual(self.model.head(fwAD.make_dual(h.detach(), tangent)))
        return hs, us, logits, t

    @staticmethod
    def jacobian_estimates(t, us):
        """Ĵ_l = t^T u_l / batch, one matmul per block (never the [batch, classes, D] product)."""
        n = t.shape[0]
        return [(t.t() @ u.flatten(1)).div_(n).view(t.shape[1], *u.shape[1:]) for u in us]

    def train_step(self, x, y) -> StepOutput:
        hs, us, logits, t = self.dual_forward(x)
        loss = self.loss(logits, y)
        self.inject_and_backward(hs, logits, loss)
        self.update_feedback(self.jacobian_estimates(t.detach(), us))
        return StepOutput(loss.detach(), logits.detach())

    @torch.no_grad()
    def update_feedback(self, estimates):
        if self.feedback_update == "ema":
            for b, j in zip(self.feedback, estimates):
                if self.feedback_decay:
                    b.mul_(1 - self.feedback_decay)
                b.mul_(self.momentum).add_(j, alpha=1 - self.momentum)
        else:
            for b, j in zip(self.feedback, estimates):
                b.grad = b - j
            self.feedback_optimizer.step()

    def extra_state_for_checkpoint(self) -> dict:
        if self.feedback_optimizer is None:
            return {}
        return {"feedback_optimizer": self.feedback_optimizer.state_dict()}
