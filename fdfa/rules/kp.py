"""Kolen-Pollack, KP (Akrout et al. 2019, "Deep learning without weight transport").

FA (fdfa.rules.fa) whose B_l learns: B_l gets the same update as W_l, each with its own weight
decay, so their difference decays. With gradient G_l = dL/dW_l and SGD at lr η, decay λ:

    W <- W - η (G + λ W),   B <- B - η (G + λ B),   so   B - W <- (1 - η λ) (B - W).

How "the same update" is realised: after the backward pass fills W_l.grad = G_l (the usual
gradient from the signal that arrives), the rule sets B_l.grad to a copy of it and steps its own
``feedback_optimizer``; the trainer then steps W_l with the forward optimizer. The feedback
optimizer is built by ``feedback_optimizer(params)``, and conf/algorithm/kp.yaml makes that the
forward optimizer's own config (``${optimizer}``): the same class, lr, momentum or betas and
weight decay, with its own state. So B_l and W_l take the same step from the same gradient, each
with its own decay term λB or λW: under SGD their difference shrinks exactly as above; under Adam
by about η λ / sqrt(v) per step and element (v: Adam's second moment, shared up to the decay
terms). KP needs a weight decay: conf/algorithm/optimizer/kp_adam.yaml (and kp_sgd.yaml) sets
one. The forward scheduler (StepLR) decays W's lr only; B keeps the initial lr, as every feedback
optimizer in fdfa. B_l starts as FA's random B_l; the step uses B_l before its update. Built in
Python without ``feedback_optimizer``: Adam at lr 1e-4, decay 1e-3 (fdfa.rules.base.FeedbackAdam).
Under torchrun (fdfa/distributed.py) B_l's gradient is averaged over the ranks, as W_l's is.
"""

import torch

from fdfa.distributed import average_gradients
from fdfa.rules.base import FeedbackAdam
from fdfa.rules.fa import FA


class KP(FA):
    def __init__(self, model, feedback_optimizer=None):
        if feedback_optimizer is not None and not callable(feedback_optimizer):
            raise ValueError(
                "feedback_optimizer must build an optimizer from parameters "
                f"(e.g. ${{optimizer}}), got {feedback_optimizer!r}"
            )
        super().__init__(model)
        params = self.feedback_weights.parameters()
        if feedback_optimizer is None:
            self.feedback_optimizer = FeedbackAdam(params, lr=1e-4, weight_decay=1e-3)
        else:
            self.feedback_optimizer = feedback_optimizer(params)

    def train_step(self, x, y):
        out = super().train_step(x, y)
        for b, layer in zip(self.feedback_weights, self.layers):
            grad = layer.weight.grad
            b.grad = torch.zeros_like(b) if grad is None else grad.clone()  # W's gradient
        average_gradients(self.feedback_weights.parameters())  # under torchrun: the ranks' mean
        step = getattr(self.feedback_optimizer, "update", self.feedback_optimizer.step)
        step()
        return out
