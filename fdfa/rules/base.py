"""The interface of a learning rule, and the direct-feedback machinery DFA, DKP and FDFA share.

A rule wraps the model (so ``rule.to(device)`` and ``rule.state_dict()`` carry the model and the
rule's own state together: feedback tensors, the state of its feedback optimizer and of the random
generator it draws from) and implements one method::

    train_step(x, y) -> StepOutput(loss, logits)

which fills ``.grad`` of every model parameter for the batch and updates the rule's own state
(feedback matrices). The trainer then calls the forward optimizer's ``step()``. The public face
of the same step, for a loop of your own (fdfa/api.py), is ``rule.step(x, y, loss_fn=None)``.

The activity-perturbed rules (FDFA, FG-A) share the perturbed forward passes at the bottom of
this file: ``dual_forward`` (one direction) and ``perturbed_forward`` (k directions stacked), one
pass each, with the closed-form tangents of fdfa.tangents.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fdfa.checks import check_arguments, fraction, integer, number, one_of
from fdfa.errors import FdfaError
from fdfa.models import check_block_net, hidden_shapes
from fdfa.rules.perturbation import draw
from fdfa.tangents import forward_with_tangent

# The checks of the options several rules share (fdfa/checks.py), declared once.
FEEDBACK_INIT = one_of("zeros", "kaiming")
FEEDBACK_LR = number(1e-4)
FEEDBACK_DECAY = fraction(0.0)
N_DIRECTIONS = integer(1, example=4)

log = logging.getLogger(__name__)


class StepOutput(NamedTuple):
    loss: torch.Tensor  # detached scalar, mean cross-entropy over the batch
    logits: torch.Tensor  # detached [batch, num_classes]


class StepResult(NamedTuple):
    """What ``rule.step`` returns: ``out, loss = rule.step(x, y)``."""

    out: torch.Tensor  # the model's output for x, detached [batch, num_classes]
    loss: torch.Tensor  # the loss of that output, detached scalar


class LearningRule(nn.Module):
    """Base class: holds the model as ``self.model``."""

    # True for rules whose update comes from forward-mode directional derivatives (FDFA, FG-W,
    # FG-A); with ``jacobian_estimates`` (FDFA) the metrics add estimator/<l>/jacobian_rel_mse.
    forward_mode: bool = False

    def __init__(self, model: nn.Module):
        super().__init__()
        check_block_net(model)
        self.model = model
        self.register_state_dict_post_hook(_save_own_state)
        self.register_load_state_dict_pre_hook(_load_own_state)

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        raise NotImplementedError

    def step(self, x: torch.Tensor, y: torch.Tensor, loss_fn=None) -> StepResult:
        """One step of the rule on the batch (x, y): fills (accumulates into, as ``backward``
        does) ``.grad`` of every model parameter with the rule's update and updates the rule's
        own state (its feedback tensors take their step here); your optimizer then steps the
        model. Returns ``(out, loss)``, both detached.

        ``loss_fn(out, y)``: a scalar loss in place of the rules' mean cross-entropy (it must be
        differentiable in ``out``; FG-W also differentiates it in forward mode). Under
        ``torch.autocast`` the forward and the injected signals run in autocast's dtype, the
        rule's own state (feedback, its optimizer, FG-W's estimate) in its own (float32)."""
        with self.using_loss(loss_fn):
            loss, out = self.train_step(x, y)
        for p in self.own_parameters():  # consumed by the rule's own optimizer: never by yours
            p.grad = None
        return StepResult(out, loss)

    @contextmanager
    def using_loss(self, loss_fn):
        """Within this block, ``self.loss`` is ``loss_fn`` (None: the rule's cross-entropy)."""
        if loss_fn is None:
            yield
            return
        if not callable(loss_fn):
            raise ValueError(f"loss_fn must be a function of (out, y), got {loss_fn!r}")
        object.__setattr__(self, "loss", loss_fn)  # an nn.Module loss too: not a submodule
        try:
            yield
        finally:
            del self.__dict__["loss"]

    def own_parameters(self) -> list[nn.Parameter]:
        """The rule's own tensors that are nn.Parameters (feedback), not the model's."""
        model = {id(p) for p in self.model.parameters()}
        return [p for p in self.parameters() if id(p) not in model]

    def local_forward(self, x: torch.Tensor):
        """Forward with every block's input detached, so each block's graph is its own."""
        return local_forward(self.model, x)


RNG = "rng."  # + the device type: the state of torch's generator there, in a rule's state_dict


def _save_own_state(rule, state: dict, prefix: str, metadata) -> None:
    """``state_dict()`` hook: besides the model and the feedback tensors, the state of each
    optimizer the rule holds (``<name>.state.<i>.<key>``: Adam's, SGD's tensors) and of torch's
    generator on the rule's device (``rng.<device type>``), which the random rules (FDFA, FG-W,
    FG-A, brSF) and the model's dropout draw from. Tensors only, as every state_dict."""
    for name, opt in rule_optimizers(rule).items():
        for i, values in opt.state_dict()["state"].items():
            for key, value in values.items():
                if torch.is_tensor(value):
                    state[f"{prefix}{name}.state.{i}.{key}"] = value
    device = next(rule.model.parameters()).device
    rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()
    state[f"{prefix}{RNG}{device.type}"] = rng


def _load_own_state(rule, state: dict, prefix: str, *args) -> None:
    """``load_state_dict()`` hook: takes ``_save_own_state``'s entries out and restores them (the
    generator's when saved on the same kind of device). A state without them (last.ckpt of an
    earlier fdfa, whose trainer saved the optimizers beside it) leaves them as they are."""
    rngs = {k[len(prefix + RNG) :]: state.pop(k) for k in list(state) if k.startswith(prefix + RNG)}
    if not rngs:
        return
    for name, opt in rule_optimizers(rule).items():
        mark = f"{prefix}{name}.state."
        saved: dict[int, dict] = {}
        for key in [k for k in state if k.startswith(mark)]:
            i, entry = key[len(mark) :].split(".", 1)
            saved.setdefault(int(i), {})[entry] = state.pop(key).clone()  # never shared
        opt.load_state_dict({"state": saved, "param_groups": opt.state_dict()["param_groups"]})
    device = next(rule.model.parameters()).device
    if device.type == "cuda" and "cuda" in rngs:
        torch.cuda.set_rng_state(rngs["cuda"], device)
    elif device.type in rngs:
        torch.set_rng_state(rngs[device.type])


@contextmanager
def own_precision(device: torch.device):
    """Autocast off on ``device``: a rule's update of its own state (feedback, FG-W's estimate)
    runs in that state's dtype also when the step runs under ``torch.autocast``."""
    with torch.autocast(device.type, enabled=False):
        yield


def rule_optimizers(rule: nn.Module) -> dict[str, torch.optim.Optimizer]:
    """The optimizers a rule holds as attributes (e.g. DKP's and FDFA's ``feedback_optimizer``),
    by attribute name: checkpoints save them, CUDA graphs capture their steps."""
    return {k: v for k, v in vars(rule).items() if isinstance(v, torch.optim.Optimizer)}


def local_forward(model: nn.Module, x: torch.Tensor):
    """Block outputs ``hs`` and logits; every block (and the head) sees a detached input, so a
    backward from h_l reaches block l's parameters only. Returns (hs, logits)."""
    hs = []
    h = x
    for block in model.blocks:
        h = block(h.detach())
        hs.append(h)
    logits = model.head(h.detach())
    return hs, logits


def project_error(e: torch.Tensor, feedback: torch.Tensor) -> torch.Tensor:
    """e [batch, classes] times B [classes, *shape] -> the error e.B at a block output."""
    return (e @ feedback.flatten(1)).view(e.shape[0], *feedback.shape[1:])


# The most memory the feedback tensors B_l of one rule may take together: B_l is
# [classes, *h_l.shape[1:]], so a large block output times many classes (ImageNet) grows fast;
# DKP's and FDFA's Adam keeps two more tensors of each size.
FEEDBACK_LIMIT_BYTES = 2 * 2**30


def check_feedback_memory(model: nn.Module, shapes, element_size: int) -> int:
    """Log the bytes the feedback tensors B_l will take; raise FdfaError past
    ``FEEDBACK_LIMIT_BYTES``, naming the model's ``feedback_option`` (e.g.
    ``model.feedback_at=stage``) that lowers it when it has one. Returns the bytes."""
    per_class = sum(math.prod(shape) for shape in shapes)
    size = model.num_classes * per_class * element_size
    log.info("feedback tensors B_l: %d, %.1f MiB in all", len(shapes), size / 2**20)
    if size > FEEDBACK_LIMIT_BYTES:
        option = getattr(model, "feedback_option", None)
        fix = f"set {option}" if option else "inject at fewer or smaller block outputs"
        raise FdfaError(
            f"the feedback tensors B_l would take {size / 2**30:.1f} GiB, over the limit of "
            f"{FEEDBACK_LIMIT_BYTES / 2**30:g} GiB (fdfa.rules.base.FEEDBACK_LIMIT_BYTES): {fix}"
        )
    return size


class DirectFeedbackRule(LearningRule):
    """Shared by DFA, DKP and FDFA: one feedback tensor B_l of shape [classes, *h_l.shape[1:]] per
    hidden block, created here from a probe forward; each block is trained on its local graph."""

    @check_arguments(init=FEEDBACK_INIT)
    def __init__(self, model: nn.Module, init: str = "zeros"):
        super().__init__(model)
        params = []
        ref = next(model.parameters())  # feedback lives on the model's device, in its dtype
        shapes = hidden_shapes(model)
        check_feedback_memory(model, shapes, ref.element_size())
        for shape in shapes:
            b = torch.empty(model.num_classes, *shape, device=ref.device, dtype=ref.dtype)
            if init == "kaiming":
                nn.init.kaiming_uniform_(b)
            else:
                nn.init.zeros_(b)
            params.append(nn.Parameter(b, requires_grad=False))
        self.feedback = nn.ParameterList(params)

    def inject_and_backward(self, hs, logits, loss):
        """Exact gradient for the head; e.B_l injected at each h_l. One autograd call.

        Returns e = dL/dlogits (detached)."""
        (e,) = torch.autograd.grad(loss, logits, retain_graph=True)
        injected = [project_error(e, b) for b in self.feedback]
        torch.autograd.backward([logits, *hs], [e, *injected])
        return e


class FeedbackAdam(torch.optim.Adam):
    """``torch.optim.Adam(fused=True)`` for a rule's feedback tensors, stepped with ``update()``:
    the same fused kernel on the same state (so the same numbers and the same state_dict), without
    ``step()``'s per-call bookkeeping, which for a few small tensors costs more than the kernel
    itself (python -m fdfa.bench times a step)."""

    def __init__(self, params, lr: float, weight_decay: float = 0.0):
        # A torch without the private fused kernel gets plain Adam (step()): the same update.
        self.fused_kernel = getattr(torch, "_fused_adam_", None)
        fused = self.fused_kernel is not None
        super().__init__(params, lr=lr, weight_decay=weight_decay, fused=fused)

    def __setstate__(self, state):  # copy.deepcopy / pickle keep only torch's Optimizer state
        super().__setstate__(state)
        self.fused_kernel = getattr(torch, "_fused_adam_", None) if self.defaults["fused"] else None

    @torch.no_grad()
    def update(self) -> None:
        if self.fused_kernel is None:
            self.step()
            return
        group = self.param_groups[0]
        params = group["params"]
        for p in params:
            if not self.state[p]:  # Adam's lazy state, as torch.optim.Adam makes it when fused
                self.state[p] = {
                    "step": torch.zeros((), dtype=torch.float32, device=p.device),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }
        states = [self.state[p] for p in params]
        steps = [state["step"] for state in states]
        torch._foreach_add_(steps, 1)
        beta1, beta2 = group["betas"]
        self.fused_kernel(
            params, [p.grad for p in params], [state["exp_avg"] for state in states],
            [state["exp_avg_sq"] for state in states], [], steps, lr=group["lr"], beta1=beta1,
            beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"], amsgrad=False,
            maximize=False,
        )  # fmt: skip


def dual_forward(model: nn.Module, x: torch.Tensor, us=None, perturbation: str = "gaussian"):
    """One forward pass that also carries a forward-mode tangent (one direction).

    At each block output h_l a perturbation u_l (drawn as ``perturbation`` says, N(0, I) by
    default, unless ``us`` gives it) is added to the tangent, so the logits' tangent is
    t = sum_l J_l u_l (J_l: Jacobian of the logits w.r.t. h_l). Block inputs are detached from the
    reverse-mode graph (local training), not from the tangent, which flows through the whole net.
    BatchNorm buffers update once, as in a plain training forward. Returns (hs, us, logits, t), t
    of shape [batch, classes]."""
    return _tangent_forward(model, x, None, us, perturbation)


def draw_block_perturbations(kind: str, shapes, batch: int, k: int | None, like: torch.Tensor):
    """Directions for every block output at once (one generator call, fdfa.rules.perturbation):
    u_l of shape [batch, *shapes[l]], or [k, batch, *shapes[l]] for k stacked directions."""
    lead = (batch,) if k is None else (k, batch)
    return draw(kind, [(*lead, *shape) for shape in shapes], like.device, like.dtype)


def _tangent_forward(model: nn.Module, x: torch.Tensor, k: int | None, us=None, kind="gaussian"):
    """The pass behind ``dual_forward`` (k None: one direction, unstacked tangents) and
    ``perturbed_forward`` (k directions stacked in a leading dim). Tangents come from the closed
    forms in fdfa.tangents (torch's forward-mode AD for layer types it does not know). The first
    block's tangent is its u_1 alone: nothing is computed for it."""
    if us is None:  # the rules pass their draws; here the block shapes come from a probe forward
        us = draw_block_perturbations(kind, hidden_shapes(model), len(x), k, x)
    hs = []
    h, tangent = x, None
    for block, u in zip(model.blocks, us):
        h, h_tangent = forward_with_tangent(block, h.detach(), tangent)
        tangent = u if h_tangent is None else h_tangent.add_(u)
        hs.append(h)
    logits, t = forward_with_tangent(model.head, h.detach(), tangent)
    return hs, list(us), logits, t


@contextmanager
def batch_statistics_only(model: nn.Module):
    """Within this block, normalisation layers in training mode still normalise with the batch's
    statistics but leave their running buffers alone (``torch.func`` transforms cannot mutate
    them, and a second pass over the batch must not count twice). Restored on exit."""
    saved = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats:
            saved.append((m, m.running_mean, m.running_var, m.num_batches_tracked))
            m.running_mean = m.running_var = m.num_batches_tracked = None
            m.track_running_stats = False
    try:
        yield
    finally:
        for m, mean, var, count in saved:
            m.running_mean, m.running_var, m.num_batches_tracked = mean, var, count
            m.track_running_stats = True


def perturbed_forward(
    model: nn.Module, x: torch.Tensor, n_directions: int = 1, us=None, perturbation="gaussian"
):
    """Activity-perturbed forward pass with k = ``n_directions`` independent directions.

    Returns (hs, us, logits, t): block outputs on local graphs (as ``local_forward``), the
    perturbations us[l] of shape [k, batch, *h_l.shape[1:]] (drawn as ``perturbation`` says unless
    given; the same numbers as a rule's step draws after the same seed), logits, and the logits'
    tangents t of shape [k, batch, classes], t[i] = sum_l J_l us[l][i]. One pass: the primal once
    (BatchNorm buffers update once), the k tangents side by side."""
    if n_directions == 1:
        one = None if us is None else [u[0] for u in us]
        hs, drawn, logits, t = dual_forward(model, x, one, perturbation)
        return hs, [u.unsqueeze(0) for u in drawn], logits, t.unsqueeze(0)
    return _tangent_forward(model, x, n_directions, us, perturbation)
