"""An fdfa rule driving a PyTorch Lightning LightningModule (``pip install 'fdfa[lightning]'``).

    python examples/lightning_loop.py

With ``automatic_optimization = False`` Lightning leaves the step to the module: the rule fills
``.grad`` (``rule.step``), the optimizer of ``configure_optimizers`` steps. The rule is a
submodule, so Lightning's checkpoints carry its state (feedback tensors, their optimizer, the
generator state) beside the model's. The optimizer takes ``rule.model.parameters()``: the model's
weights; the rule steps its own feedback itself. ``tests/test_api.py`` runs ``fit`` for a few
steps and checks it trains exactly as the plain loop does.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import nn

import fdfa


class RuleModule(pl.LightningModule):
    """Trains ``rule.model`` with ``rule`` (from ``fdfa.rule``) and SGD with momentum."""

    def __init__(self, rule, lr: float = 0.05):
        super().__init__()
        self.automatic_optimization = False
        self.rule = rule
        self.lr = lr

    def forward(self, x):
        return self.rule.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()
        out, loss = self.rule.step(x, y)  # fills .grad of every parameter by the rule
        opt.step()
        opt.zero_grad()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.rule.model.parameters(), lr=self.lr, momentum=0.9)


def fit(rule, loader, max_steps: int, lr: float = 0.05) -> RuleModule:
    """Train with Lightning on the CPU for ``max_steps`` steps, quietly; returns the module."""
    module = RuleModule(rule, lr)
    trainer = pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)
    return module


def main() -> None:
    """A small MLP on synthetic 4-class data, trained with FDFA for 200 steps."""
    torch.manual_seed(0)
    prototypes = torch.randn(4, 32)
    y = torch.randint(0, 4, (2048,))
    x = prototypes[y] + 0.5 * torch.randn(2048, 32)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    net = nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)
    )
    model = fdfa.wrap(net, blocks=[["0", "1"], ["2", "3"]], head="4", input_shape=(32,))
    module = fit(fdfa.rule("fdfa", model), loader, max_steps=200)
    with torch.no_grad():
        accuracy = (module(x).argmax(1) == y).float().mean().item()
    print(f"train accuracy after 200 FDFA steps: {accuracy:.3f}")


if __name__ == "__main__":
    main()
