"""Trains each rule named on the command line, one after another, in one process group: run by
tests/test_distributed.py under torchrun (2 ranks), so that one torchrun start covers them all.

    torchrun --standalone --nproc_per_node=2 tests/ddp_driver.py OUT_DIR BATCH bp dfa dkp fdfa

Each rule's run dir is OUT_DIR/<rule>. ``fdfa`` steps with ``fixed_directions``: the same
directions for the same global batch whatever the number of ranks."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from fdfa.rules import FDFA
from fdfa.train import train
from tests.helpers import compose_config, synthetic_overrides

# algorithm overrides by name (fdfa_ema: FDFA's other feedback update)
RULES = {
    "bp": ["algorithm=bp"],
    "dfa": ["algorithm=dfa"],
    "dkp": ["algorithm=dkp"],
    "fdfa": ["algorithm=fdfa"],
    "fdfa_ema": ["algorithm=fdfa", "algorithm.feedback_update=ema"],
}


def overrides(rule: str, batch_size: int) -> list[str]:
    """6 steps over 2 epochs (4 global batches of 64 an epoch) of a net without BatchNorm."""
    return synthetic_overrides(
        *RULES[rule],
        f"dataset.batch_size={batch_size}",
        "model.batchnorm=false",
        "trainer.device=cpu",
        "trainer.max_steps=6",
        "trainer.epochs=2",
    )


def fixed_directions(rank: int, ranks: int) -> None:
    """FDFA's k-th step draws, for the global batch of ``ranks * batch`` samples, the directions
    of a generator seeded by k, and keeps this rank's slice of them."""

    def draw(self, batch_size):
        self.draws = getattr(self, "draws", 0) + 1
        g = torch.Generator().manual_seed(self.draws)
        part = slice(rank * batch_size, (rank + 1) * batch_size)
        return [torch.randn(ranks * batch_size, *s, generator=g)[part] for s in self.shapes]

    FDFA.draw_perturbations = draw


def main(out: str, batch_size: str, *rules: str) -> None:
    dist.init_process_group("gloo")  # once for all runs: train() uses the caller's group
    fixed_directions(dist.get_rank(), dist.get_world_size())
    for rule in rules:
        train(compose_config(overrides(rule, int(batch_size))), Path(out) / rule)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "offline")
    main(*sys.argv[1:])
