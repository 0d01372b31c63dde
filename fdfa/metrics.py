"""How close each rule's updates come to backprop's, measured on the side of training.

Every ``every_n_steps`` steps the trainer takes ``used = feedback_before_step(rule)`` right before
``rule.train_step(x, y)`` and calls ``measure(rule, x, y, used)`` right after it, before
``optimizer.step()``, so each parameter's ``.grad`` holds the rule's update for the batch (x, y)
and ``used`` the feedback B that update came from. ``measure`` then runs its own forward pass on
the same batch with the same weights and compares. It never changes what training sees: ``.grad``,
BatchNorm running statistics, torch's random number generators and the rule's feedback are as
before.

Hidden block l is named by position and by its first Conv/Linear layer: ``fc1``, ``conv2``, ...
(``block3`` when it has neither). With W_l that layer's weight, the keys are:

- ``align/<l>/cos``, ``align/<l>/angle_deg``: between the rule's update of W_l and the true
  gradient dL/dW_l (cos 1, angle 0 for BP), and ``align/mean_cos``, the mean over blocks.
- ``align/<l>/norm_ratio``: |rule's update| / |dL/dW_l|.
- ``feedback/<l>/cos`` (rules with one feedback tensor per block: DFA, DKP, FDFA, DRTP): between
  the B_l the step used and the target J_l of :func:`output_jacobians`. For the backward-path
  rules (FA, KP, uSF, brSF, frSF: ``feedback_pairs()``) it is per weight layer instead, between
  the B that layer's backward used in the step and its W (names: :func:`weight_layer_names`).
  DKP, FDFA and KP update B inside their step, after using it, and brSF draws a new B every step:
  B read after the step is not the step's, so :meth:`AlignmentMetrics.feedback_before_step`
  copies B before it: on measured steps only, where a rule keeping the B of its last step would
  copy B at every step (KP: every weight). brSF's B is drawn there on a fork of the generators,
  which gives the step's own draw (its step draws B first). ``measure`` without ``used`` takes B
  as it is then: after the step's update (brSF: the next step's draw).
- ``estimator/<l>/grad_rel_mse`` (every rule): |update - dL/dW_l|^2 / |dL/dW_l|^2, the relative
  squared error of the rule's update of W_l, the update it applies (0 for BP; for DFA and DKP a
  deterministic function of B_l; for FDFA the update from its B_l, not Ĵ_l). One number on one
  scale for every rule: its expectation is the update's relative bias^2 plus its variance.
- ``estimator/<l>/jacobian_rel_mse`` (FDFA: a forward-mode rule with feedback and
  ``jacobian_estimates``): |Ĵ_l - J_l|^2 / |J_l|^2 of a fresh draw of the step's Jacobian estimate
  (same batch, weights and ``n_directions``) against the target J_l of :func:`output_jacobians`.

A cosine with a zero vector is reported as 0 (angle 90).

Cost of one measurement: a forward and a backward pass, plus, for the J_l behind ``feedback/*`` and
``estimator/*/jacobian_rel_mse``, one reverse pass per (sample, class) pair (batched): many
training steps' worth, spread thin by ``every_n_steps`` (``python -m fdfa.bench
--metrics-overhead`` measures the share), and growing with batch x classes x model size: for
AlexNet on CIFAR-100 set ``jacobian_metrics=false`` (alignment and ``grad_rel_mse`` only, about a
forward and a backward pass) or a much larger ``every_n_steps``. ``jacobian_samples=m`` takes
J_l (and FDFA's fresh Ĵ_l beside it) over the batch's first m samples only, in the whole batch's
forward pass: m x classes reverse passes instead of batch x classes (the ResNet and ViT presets
set 8: a ResNet-20 measurement at batch 128 took over 3 minutes on 2 CPU cores with all 128). J_l
of m samples is a noisier target than that of the batch: ``feedback/*/cos`` reads lower.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from fdfa.checks import boolean, check_arguments, integer, number
from fdfa.rules.base import perturbed_forward

TINY = 1e-300  # guards divisions by a zero norm (float64)
WEIGHT_LAYERS = (nn.Linear, nn.modules.conv._ConvNd)
# layers acting on each sample alone that may precede a front's weight layer (split_per_sample)
PER_SAMPLE_FRONTS = (nn.Flatten, nn.Identity, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.AvgPool2d)


def first_weight_layer(block: nn.Module) -> nn.Module | None:
    """The first Conv or Linear module of a block (the block itself counts), or None."""
    for module in block.modules():
        if isinstance(module, WEIGHT_LAYERS):
            return module
    return None


def block_names(model: nn.Module) -> list[str]:
    """``fc1``, ``conv2``, ... : the kind of each block's first weight layer, then its position."""
    names = []
    for i, block in enumerate(model.blocks, start=1):
        layer = first_weight_layer(block)
        kind = "block" if layer is None else "fc" if isinstance(layer, nn.Linear) else "conv"
        names.append(f"{kind}{i}")
    return names


def weight_layer_names(model: nn.Module) -> dict[nn.Module, str]:
    """A name for every Conv/Linear layer: a block's first is the block's (``fc1``), its k-th
    ``<block>.<k>``; the head's ``head`` (``head.<k>``); any other layer its module path."""
    names = {}
    for owner, name in zip([*model.blocks, model.head], [*block_names(model), "head"]):
        layers = [m for m in owner.modules() if isinstance(m, WEIGHT_LAYERS)]
        for k, layer in enumerate(layers, start=1):
            names.setdefault(layer, name if k == 1 else f"{name}.{k}")
    for path, layer in model.named_modules():
        names.setdefault(layer, path)
    return names


def block_weights(block: nn.Module) -> list[nn.Parameter]:
    """The parameters whose update is compared: the first weight layer's weight (all of the
    block's parameters when it has no Conv/Linear layer)."""
    layer = first_weight_layer(block)
    if layer is not None and isinstance(getattr(layer, "weight", None), nn.Parameter):
        return [layer.weight]
    return list(block.parameters())


def split_per_sample(module: nn.Module):
    """(front, rest) with ``module(h) == rest(front(h))`` and ``front`` acting on each sample alone
    (``PER_SAMPLE_FRONTS`` up to and including the first Linear/Conv layer), or None."""
    if isinstance(module, WEIGHT_LAYERS):
        return module, nn.Identity()
    if isinstance(module, nn.Sequential):
        for i, layer in enumerate(module):
            if isinstance(layer, WEIGHT_LAYERS):
                return module[: i + 1], module[i + 1 :]
            if not isinstance(layer, PER_SAMPLE_FRONTS):
                return None
    return None


def side_forward(model: nn.Module, x: torch.Tensor):
    """A forward through the whole net (no detached inputs), as BP's.

    Returns the logits, the block outputs hs, and for each h_l a tap (tensor, front): the output
    of the per-sample front of the next block (or of the output layer) and that front, when it
    has one (see :func:`split_per_sample`), else (h_l, None). The Jacobian w.r.t. h_l is taken at
    the tap, then through the front on each sample's own row: much cheaper than a batched reverse
    pass through the next Linear/Conv layer for every (sample, class) pair."""
    modules = [*model.blocks, model.head]
    hs, taps, h = [], [], x
    for i, module in enumerate(modules):
        split = split_per_sample(module) if i > 0 else None
        if split is None:
            if i > 0:
                taps.append((h, None))
            h = module(h)
        else:
            a = split[0](h)
            taps.append((a, split[0]))
            h = split[1](a)
        if i < len(model.blocks):
            hs.append(h)
    return h, hs, taps


def output_jacobians(
    logits, hs, taps, chunk_mb: float = 32, samples: int | None = None
) -> list[torch.Tensor]:
    """J_l[c] = mean_n d logits[n, c] / d hs[l][n] for every block output, exactly.

    ``samples``: the mean over the batch's first ``samples`` rows only (None: all), each still
    in the whole batch's forward pass (BatchNorm's statistics are the batch's); the cost is one
    reverse pass per (row, class) pair, so it falls in proportion.

    Only the diagonal blocks n == m of the batch Jacobian d logits[n] / d h[m] count: with
    BatchNorm in train mode a sample's logits also depend on the other samples, and FDFA's
    estimate t^T u_l / batch has expectation mean_n d z_n / d h_n (E[u_n u_m^T] = 0 for n != m).
    One reverse pass per (sample, class) pair from the logits to the taps of :func:`side_forward`
    (batched with ``is_grads_batched``, ``chunk_mb`` MiB of gradients per batch), then, for a tap
    behind a per-sample front a_n = f(h_n), d z_n / d h_n = d z_n / d a_n . d a_n / d h_n on row n.
    Returns tensors of shape [classes, *h.shape[1:]].
    """
    n, classes = logits.shape
    rows_used = n if samples is None else min(samples, n)
    tensors = [tap for tap, _ in taps]
    per_pair = n * sum(t[0].numel() for t in tensors) * logits.element_size()
    chunk = max(1, int(chunk_mb * 2**20 // per_pair))
    targets = [logits.new_zeros(classes, *h.shape[1:]) for h in hs]
    pairs = torch.arange(rows_used * classes, device=logits.device)
    for start in range(0, rows_used * classes, chunk):
        pair = pairs[start : start + chunk]
        rows, cols = pair // classes, pair % classes
        k = torch.arange(len(pair), device=logits.device)
        seeds = logits.new_zeros(len(pair), n, classes)
        seeds[k, rows, cols] = 1
        grads = torch.autograd.grad(
            logits, tensors, seeds, is_grads_batched=True, retain_graph=True
        )
        for target, grad, (_, front), h in zip(targets, grads, taps, hs):
            rows_grad = grad[k, rows]  # d logits[n, c] / d tap[n]
            if front is not None:  # through the front, on sample n's own input
                inp = h.detach()[rows].requires_grad_()
                (rows_grad,) = torch.autograd.grad(front(inp), inp, rows_grad)
            target.index_add_(0, cols, rows_grad)
    return [t.div_(rows_used) for t in targets]


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in tensors])


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a @ b) / (a.norm() * b.norm()).clamp_min(TINY)


def angle_deg(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The angle between a and b, accurate also near 0 (where acos of a cosine is not)."""
    na, nb = a.norm(), b.norm()
    ua, ub = a / na.clamp_min(TINY), b / nb.clamp_min(TINY)
    angle = torch.rad2deg(2 * torch.atan2((ua - ub).norm(), (ua + ub).norm()))
    return torch.where((na > 0) & (nb > 0), angle, torch.full_like(angle, 90.0))


def rel_mse(estimate: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    return (estimate - truth).square().sum() / truth.square().sum().clamp_min(TINY)


class Feedback(NamedTuple):
    """The B behind ``feedback/*``: one per block (``rule.feedback``; None when the rule has no
    such list) and the (layer, B) pairs of the backward-path rules (``rule.feedback_pairs()``)."""

    blocks: list[torch.Tensor] | None
    pairs: list[tuple[nn.Module, torch.Tensor]]


def rule_feedback(rule) -> Feedback:
    """The rule's feedback as it is now (brSF: a draw from torch's generators as they are)."""
    feedback = getattr(rule, "feedback", None)
    per_block = feedback is not None and len(feedback) == len(rule.model.blocks)
    pairs = rule.feedback_pairs() if callable(getattr(rule, "feedback_pairs", None)) else []
    return Feedback(list(feedback) if per_block else None, list(pairs))


def forked_rng(device: torch.device):
    """A context that restores torch's CPU generator and ``device``'s on exit."""
    accelerator = [] if device.type == "cpu" else [device]  # the CPU generator always forks
    return torch.random.fork_rng(devices=accelerator, device_type=device.type)


class AlignmentMetrics:
    """Alignment, feedback and estimator metrics every ``every_n_steps`` steps (None: never)."""

    @check_arguments(
        "metrics.",  # built from the metrics section alone: its messages name its keys
        every_n_steps=integer(1, example=1000, null=True, note=" ({null} turns the metrics off)"),
        jacobian_metrics=boolean(),
        jacobian_chunk_mb=number(32),
        jacobian_samples=integer(1, example=16, null=True, note=" ({null}: the whole batch)"),
    )
    def __init__(
        self,
        every_n_steps: int | None = 1000,
        jacobian_metrics: bool = True,
        jacobian_chunk_mb: float = 32,
        jacobian_samples: int | None = None,
    ):
        self.every_n_steps = every_n_steps
        self.jacobian_metrics = jacobian_metrics
        self.jacobian_chunk_mb = float(jacobian_chunk_mb)
        self.jacobian_samples = jacobian_samples

    def due(self, step: int) -> bool:
        """True when step (1-based: the step just taken) is a multiple of every_n_steps."""
        return self.every_n_steps is not None and step % self.every_n_steps == 0

    def feedback_before_step(self, rule) -> Feedback:
        """Copies of the feedback B that the rule's next ``train_step`` uses, for ``measure``:
        call it right before that step (brSF's B is drawn on a fork of the generators, so it is
        the draw the step makes next, and training's random numbers stay as they were)."""
        with forked_rng(next(rule.model.parameters()).device), torch.no_grad():
            blocks, pairs = rule_feedback(rule)
            return Feedback(
                None if blocks is None else [b.detach().clone() for b in blocks],
                [(layer, b.detach().clone()) for layer, b in pairs],
            )

    def measure(
        self, rule, x: torch.Tensor, y: torch.Tensor, used: Feedback | None = None
    ) -> dict[str, float]:
        """The metrics for batch (x, y); call after ``rule.train_step(x, y)``, before the step.
        ``used``: what :meth:`feedback_before_step` gave before the step (None: B as it is now)."""
        model = rule.model
        buffers = [b.detach().clone() for b in model.buffers()]
        try:
            with forked_rng(x.device), torch.enable_grad():
                values = self._measure(rule, model, x, y, used)
        finally:
            with torch.no_grad():
                for saved, live in zip(buffers, model.buffers()):
                    live.copy_(saved)
        keys = list(values)
        numbers = torch.stack([values[k].double() for k in keys]).tolist()  # one device sync
        return dict(zip(keys, numbers))

    def _measure(self, rule, model, x, y, used) -> dict[str, torch.Tensor]:
        names = block_names(model)
        weights = [block_weights(block) for block in model.blocks]
        updates = [
            flat(p.grad if p.grad is not None else torch.zeros_like(p) for p in ws)
            for ws in weights
        ]
        feedback, pairs = rule_feedback(rule) if used is None else used
        has_feedback = feedback is not None
        forward_mode = bool(getattr(rule, "forward_mode", False))
        estimates_jacobians = has_feedback and callable(getattr(rule, "jacobian_estimates", None))
        feedback_cos = has_feedback and self.jacobian_metrics
        jacobian_estimator = forward_mode and estimates_jacobians and self.jacobian_metrics

        # The true gradient (and output Jacobians) on the same batch, through the whole net.
        logits, hs, taps = side_forward(model, x)
        loss = rule.loss(logits, y)
        targets = None
        if feedback_cos or jacobian_estimator:
            targets = output_jacobians(
                logits, hs, taps, self.jacobian_chunk_mb, self.jacobian_samples
            )
        params = [p for ws in weights for p in ws]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = iter(g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params))
        true = [flat([next(grads) for _ in ws]) for ws in weights]

        estimates = None
        if jacobian_estimator:  # a fresh draw of the step's estimate; fork_rng restores the RNG
            k = int(getattr(rule, "n_directions", 1))
            kind = getattr(rule, "perturbation", "gaussian")
            _, us, _, t = perturbed_forward(model, x, k, perturbation=kind)
            rows = slice(None, self.jacobian_samples)  # the rows the target J_l averages
            folded = [u.detach()[:, rows].flatten(0, 1) for u in us]  # directions into the batch
            estimates = rule.jacobian_estimates(t.detach()[:, rows].flatten(0, 1), folded)

        out, cosines = {}, []
        for i, name in enumerate(names):
            cos = cosine(updates[i], true[i])
            cosines.append(cos)
            out[f"align/{name}/cos"] = cos
            out[f"align/{name}/angle_deg"] = angle_deg(updates[i], true[i])
            out[f"align/{name}/norm_ratio"] = updates[i].norm() / true[i].norm().clamp_min(TINY)
            if feedback_cos:
                out[f"feedback/{name}/cos"] = cosine(flat([feedback[i]]), flat([targets[i]]))
            out[f"estimator/{name}/grad_rel_mse"] = rel_mse(updates[i], true[i])
            if jacobian_estimator:
                out[f"estimator/{name}/jacobian_rel_mse"] = rel_mse(
                    flat([estimates[i]]), flat([targets[i]])
                )
        layer_names = weight_layer_names(model) if pairs else {}
        for layer, b in pairs:  # backward-path rules: the B in place of W^T against W
            out[f"feedback/{layer_names[layer]}/cos"] = cosine(flat([b]), flat([layer.weight]))
        out["align/mean_cos"] = torch.stack(cosines).mean()
        return out


def alignment(
    rule,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn=None,
    jacobian_metrics=True,
    jacobian_samples=None,
):
    """The metrics the command line logs (``AlignmentMetrics.measure``: ``align/*``,
    ``feedback/*``, ``estimator/*``) for the batch (x, y), as a dict of floats. Call it after
    ``rule.step(x, y)`` (``.grad`` holds the rule's update) and before your optimizer steps, with
    the step's ``loss_fn``; it changes neither ``.grad``, BatchNorm's buffers, torch's random
    generators nor the rule's feedback. ``jacobian_metrics=False`` leaves out ``feedback/<l>/cos``
    and ``estimator/<l>/jacobian_rel_mse`` of the direct-feedback rules (one reverse pass per
    sample and class: the expensive part); ``jacobian_samples=m`` takes them on the first m
    samples of the batch only (m passes per class)."""
    boolean()("jacobian_metrics", jacobian_metrics)
    metrics = AlignmentMetrics(
        every_n_steps=None, jacobian_metrics=jacobian_metrics, jacobian_samples=jacobian_samples
    )
    with rule.using_loss(loss_fn):
        return metrics.measure(rule, x, y)
