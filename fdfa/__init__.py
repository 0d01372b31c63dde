"""fdfa: train networks with backprop-free learning rules and compare them."""

__version__ = "0.1.0"
