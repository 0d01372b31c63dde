"""fdfa: train networks with backprop-free learning rules and compare them.

As a library (fdfa/api.py; importing it loads neither Hydra, OmegaConf, Optuna nor W&B)::

    model = fdfa.wrap(my_module, blocks=[...], head=[...], input_shape=(3, 32, 32))
    rule = fdfa.rule("fdfa", model, feedback_lr=1e-4)
    out, loss = rule.step(x, y)  # fills .grad; then your optimizer steps

The names load on first use, so ``import fdfa`` stays as light for the command line and the
report as before.
"""

import importlib
import warnings

__version__ = "0.1.0"

# Forward-mode AD of BatchNorm compiles a decomposition with torch.jit.script, which warns once per
# process about torch.jit's deprecation: noise for fdfa's users, not something they can act on.
warnings.filterwarnings(
    "ignore", message=".*torch.jit.script.*is deprecated", category=FutureWarning
)

_API = ("wrap", "rule", "options", "RULES")  # from fdfa.api
__all__ = [*_API, "metrics"]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module("fdfa.api"), name)
    if name == "metrics":  # fdfa.metrics.alignment after a plain ``import fdfa``
        return importlib.import_module("fdfa.metrics")
    raise AttributeError(f"module 'fdfa' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *__all__])
