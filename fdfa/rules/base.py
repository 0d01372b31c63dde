"""The interface of a learning rule, and the direct-feedback machinery DFA, DKP and FDFA share.

A rule wraps the model (so ``rule.to(device)`` and ``rule.state_dict()`` carry the model and the
rule's own tensors together) and implements one method::

    train_step(x, y) -> StepOutput(loss, logits)

which fills ``.grad`` of every model parameter for the batch and updates the rule's own state
(feedback matrices). The trainer then calls the forward optimizer's ``step()``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fdfa.models import check_block_net, hidden_shapes


class StepOutput(NamedTuple):
    loss: torch.Tensor  # detached scalar, mean cross-entropy over the batch
    logits: torch.Tensor  # detached [batch, num_classes]


class LearningRule(nn.Module):
    """Base class: holds the model as ``self.model``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        check_block_net(model)
        self.model = model

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        raise NotImplementedError

    def extra_state_for_checkpoint(self) -> dict:
        """State outside ``state_dict()`` (e.g. a feedback optimizer); empty by default."""
        return {}


def project_error(e: torch.Tensor, feedback: torch.Tensor) -> torch.Tensor:
    """e [batch, classes] times B [classes, *shape] -> the error e.B at a block output."""
    return (e @ feedback.flatten(1)).view(e.shape[0], *feedback.shape[1:])


class DirectFeedbackRule(LearningRule):
    """Shared by DFA, DKP and FDFA: one feedback tensor B_l of shape [classes, *h_l.shape[1:]] per
    hidden block, created here from a probe forward; each block is trained on its local graph."""

    def __init__(self, model: nn.Module, init: str = "zeros"):
        super().__init__(model)
        params = []
        for shape in hidden_shapes(model):
            ref = next(model.parameters())
            b = torch.empty(model.num_classes, *shape, device=ref.device, dtype=ref.dtype)
            if init == "kaiming":
                nn.init.kaiming_uniform_(b)
            elif init == "zeros":
                nn.init.zeros_(b)
            else:
                raise ValueError(f"feedback init must be 'zeros' or 'kaiming', got {init!r}")
            params.append(nn.Parameter(b, requires_grad=False))
        self.feedback = nn.ParameterList(params)

    def local_forward(self, x: torch.Tensor):
        """Forward with every block's input detached, so each block's graph is its own."""
        hs = []
        h = x
        for block in self.model.blocks:
            h = block(h.detach())
            hs.append(h)
        logits = self.model.head(h.detach())
        return hs, logits

    def inject_and_backward(self, hs, logits, loss):
        """Exact gradient for the head; e.B_l injected at each h_l. One autograd call.

        Returns e = dL/dlogits (detached)."""
        (e,) = torch.autograd.grad(loss, logits, retain_graph=True)
        injected = [project_error(e, b) for b in self.feedback]
        torch.autograd.backward([logits, *hs], [e, *injected])
        return e
