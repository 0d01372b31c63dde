"""fdfa's learning rules in a training loop of your own: plain PyTorch, no Hydra.

The loop (``my_module``: your ``nn.Module``; ``loader``: batches of inputs and class labels)::

    import torch
    import fdfa

    model = fdfa.wrap(my_module, blocks=[["conv1", "bn1", "relu"], "layer1", "layer2"],
                      head=["pool", "flatten", "fc"], input_shape=(3, 32, 32))
    rule = fdfa.rule("fdfa", model, feedback_lr=1e-4, perturbation="rademacher")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for x, y in loader:
        out, loss = rule.step(x, y)  # fills .grad of every parameter by the rule
        opt.step()
        opt.zero_grad()

- ``fdfa.wrap`` names the parts of your module that run in sequence: the hidden blocks (where
  the direct-feedback rules inject their signal and the forward-mode rules perturb) and the head
  (fdfa.adapter.Wrapped; the parts stay your module's own, with the same parameters). It checks on
  a probe batch that running them in order gives your module's output. A network written as an
  fdfa block network (fdfa.models.BlockNet, fdfa.resnet, fdfa.vit) passes through unchanged.
- ``fdfa.rule`` builds a rule by its config name (``RULES``: conf/algorithm/<name>.yaml), with
  that file's options as keyword arguments under the same names.
- ``rule.step(x, y, loss_fn=None)`` is one step of the rule (fdfa.rules.base.LearningRule.step):
  it fills ``.grad`` as ``loss.backward()`` would for backprop, and takes the step of the rule's
  own state (its feedback tensors); your optimizer, scheduler, gradient clipping and gradient
  accumulation see ``.grad`` as usual. The name says what it is: the rule's step, as
  ``opt.step()`` is the optimizer's; it returns ``(out, loss)``, detached, for your logging.
- ``rule.state_dict()`` / ``rule.load_state_dict()``: the model, the feedback tensors, the state
  of the rule's feedback optimizer and of torch's generator on the model's device.
- ``fdfa.metrics.alignment(rule, x, y)``: the alignment and estimator metrics the command line
  logs, between ``rule.step`` and ``opt.step()``.

This module imports neither Hydra, OmegaConf, Optuna nor W&B.
"""

from __future__ import annotations

import difflib
import inspect

from torch import nn

from fdfa.adapter import Wrapped
from fdfa.models import is_block_net
from fdfa.rules import BP, BRSF, DFA, DKP, DRTP, FA, FDFA, FGA, FGW, FRSF, KP, USF, LearningRule

# Every rule by its config name (conf/algorithm/<name>.yaml; tests/test_api.py keeps them equal).
RULES: dict[str, type[LearningRule]] = {
    "bp": BP,
    "dfa": DFA,
    "dkp": DKP,
    "fdfa": FDFA,
    "fg_w": FGW,
    "fg_a": FGA,
    "fa": FA,
    "kp": KP,
    "usf": USF,
    "brsf": BRSF,
    "frsf": FRSF,
    "drtp": DRTP,
}


def wrap(module: nn.Module, blocks=None, head=None, input_shape=None) -> nn.Module:
    """``module`` as fdfa's hidden blocks and head, for ``fdfa.rule``.

    ``blocks``: the hidden blocks in order, each a part name of ``module`` (``layer1``, or
    ``layer1.0`` inside it) or a list of names run one after the other; ``head``: the name or
    names from the last block's output to the logits (``flatten`` stands for
    ``torch.flatten(x, 1)``); ``input_shape``: one sample's shape, e.g. ``(3, 32, 32)``. Running
    the parts in order must give ``module(x)`` (checked on a probe batch; else ValueError naming
    the part). A block network (``blocks``, ``head``, ``input_shape``, ``num_classes``, as
    fdfa's own models) is returned unchanged when no parts are named."""
    if blocks is None and head is None and is_block_net(module):
        return module
    if not isinstance(module, nn.Module):
        raise ValueError(f"module must be an nn.Module, got {type(module).__name__}")
    for name, value in (("blocks", blocks), ("head", head), ("input_shape", input_shape)):
        if value is None:
            raise ValueError(
                f"{name} is required to wrap a {type(module).__name__}: e.g. fdfa.wrap(module, "
                "blocks=['layer1', 'layer2'], head=['pool', 'flatten', 'fc'], "
                "input_shape=(3, 32, 32))"
            )
    return Wrapped(module, blocks, head, input_shape, where="")


def options(name: str) -> dict:
    """The options of rule ``name`` (keyword arguments of ``fdfa.rule``) with their defaults."""
    parameters = inspect.signature(_rule_class(name).__init__).parameters
    return {k: p.default for k, p in parameters.items() if k not in ("self", "model")}


def rule(name: str, model: nn.Module, **options_) -> LearningRule:
    """The learning rule ``name`` (a key of ``RULES``: bp, dfa, dkp, fdfa, fg_w, fg_a, fa, kp,
    usf, brsf, frsf, drtp) for ``model`` (from ``fdfa.wrap``), with the options of
    conf/algorithm/<name>.yaml as keyword arguments, e.g. ``fdfa.rule("fdfa", model,
    feedback_lr=1e-4, perturbation="rademacher")``. KP's ``feedback_optimizer`` is a function of
    the feedback parameters, e.g. ``functools.partial(torch.optim.SGD, lr=0.05,
    weight_decay=1e-4)`` (the config passes the forward optimizer's). An unknown name or option,
    or a bad value, raises ValueError naming it. The rule holds the model (``rule.model``) and
    lives on its device."""
    known = options(name)
    for key in options_:
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            listed = ", ".join(known) if known else "none"
            raise ValueError(f"{name} has no option {key!r}{hint}; its options: {listed}")
    if not is_block_net(model):
        raise ValueError(
            f"model must be a block network, got a {type(model).__name__}: pass "
            "fdfa.wrap(module, blocks=[...], head=[...], input_shape=...)"
        )
    return RULES[name](model, **options_)


def _rule_class(name: str) -> type[LearningRule]:
    if name not in RULES:
        close = difflib.get_close_matches(str(name), list(RULES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"name={name!r} is no fdfa rule{hint}; rules: {', '.join(RULES)}")
    return RULES[name]
