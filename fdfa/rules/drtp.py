"""Direct Random Target Projection, DRTP (Frenkel, Lefebvre & Bol 2021, "Learning without
feedback: fixed random learning signals allow for feedforward training of deep neural networks").

DFA (fdfa.rules.dfa) with the one-hot target y* in place of the error e: the signal injected at
block output h_l is y* B_l, with B_l fixed random of shape [classes, *h_l.shape[1:]]
(kaiming-uniform, as DFA's). Sign: +y* B_l, the paper's δh_l = B_l^T y* and its reference code
(function.py, ``labels.mm(fixed_fb_weights)``, where DFA injects (y - labels) B_l). Scale: the
target of each sample divided by the batch size, the batch mean of fdfa's loss that DFA's
e = dL/dlogits carries too (the reference passes the per-sample signal, summed over the batch).
The output layer gets its exact gradient, as in every direct rule. No error reaches the hidden
blocks: they learn before (without) the output is known.
"""

import torch
import torch.nn.functional as F

from fdfa.rules.base import DirectFeedbackRule, StepOutput, project_error


class DRTP(DirectFeedbackRule):
    def __init__(self, model):
        super().__init__(model, init="kaiming")

    def target_signal(self, y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """y* / batch, [batch, classes] in the logits' dtype: what DRTP projects at every h_l."""
        return F.one_hot(y, like.shape[1]).to(like.dtype).div_(len(y))

    def train_step(self, x, y) -> StepOutput:
        hs, logits = self.local_forward(x)
        loss = self.loss(logits, y)
        target = self.target_signal(y, logits)
        injected = [project_error(target, b) for b in self.feedback]
        torch.autograd.backward([loss, *hs], [torch.ones_like(loss), *injected])
        return StepOutput(loss.detach(), logits.detach())
