"""Direct Kolen-Pollack (Webster et al. 2021): DFA whose feedback B_l is learned.

B_l starts at 0; its gradient is e^T h_l summed over the batch, applied by Adam at ``feedback_lr``
with L2 weight decay ``feedback_decay`` (as the reference code). Under torchrun
(fdfa/distributed.py) that gradient is averaged over the ranks before Adam's step, as the forward
weights' are."""

from fdfa.checks import check_arguments
from fdfa.distributed import average_gradients
from fdfa.rules.base import (
    FEEDBACK_DECAY,
    FEEDBACK_LR,
    DirectFeedbackRule,
    FeedbackAdam,
    StepOutput,
    own_precision,
)


class DKP(DirectFeedbackRule):
    @check_arguments(feedback_lr=FEEDBACK_LR, feedback_decay=FEEDBACK_DECAY)
    def __init__(self, model, feedback_lr: float = 1e-4, feedback_decay: float = 0.0):
        super().__init__(model, init="zeros")
        self.feedback_optimizer = FeedbackAdam(
            self.feedback.parameters(), lr=feedback_lr, weight_decay=feedback_decay
        )

    def train_step(self, x, y) -> StepOutput:
        hs, logits = self.local_forward(x)
        loss = self.loss(logits, y)
        e = self.inject_and_backward(hs, logits, loss)
        # The feedback used above is B before this step's update, as in the reference code.
        with own_precision(e.device):  # B's gradient in B's dtype, also under autocast
            for b, h in zip(self.feedback, hs):
                b.grad = (e.t().to(b.dtype) @ h.detach().flatten(1).to(b.dtype)).view_as(b)
            average_gradients(self.feedback)  # under torchrun: the ranks' mean
            self.feedback_optimizer.update()
        return StepOutput(loss.detach(), logits.detach())
