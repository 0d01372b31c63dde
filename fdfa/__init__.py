"""fdfa: train networks with backprop-free learning rules and compare them."""

import warnings

__version__ = "0.1.0"

# Forward-mode AD of BatchNorm compiles a decomposition with torch.jit.script, which warns once per
# process about torch.jit's deprecation: noise for fdfa's users, not something they can act on.
warnings.filterwarnings(
    "ignore", message=".*torch.jit.script.*is deprecated", category=FutureWarning
)
