"""The training loop: data -> model -> rule -> optimizer -> metrics -> loggers, in one place."""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from fdfa.errors import DivergedError, FdfaError

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise FdfaError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise FdfaError(f"trainer.device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


@torch.inference_mode()
def evaluate(model: torch.nn.Module, data) -> dict:
    """Mean cross-entropy and accuracy (a fraction) over the whole test set."""
    model.eval()
    loss_sum = torch.zeros((), device=data.test_y.device)
    correct = torch.zeros((), device=data.test_y.device, dtype=torch.long)
    for x, y in data.test_batches():
        logits = model(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    n = len(data.test_y)
    return {"test/loss": loss_sum.item() / n, "test/acc": correct.item() / n}


class Run:
    """Everything one training job builds from its config."""

    def __init__(
        self, cfg: DictConfig, out_dir: str | Path, names: dict | None = None, callbacks=()
    ):
        self.cfg = cfg
        # Objects with ``on_evaluation(run, record)``, called after each evaluation is logged; one
        # may raise to end the run (a sweeper's pruner raises optuna.TrialPruned).
        self.callbacks = list(callbacks)
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(cfg.seed)
        self.device = resolve_device(cfg.trainer.device)
        self.data = instantiate(cfg.dataset)
        self.data.setup(self.device, resize_to=cfg.model.get("input_size"))
        self.model = instantiate(
            cfg.model, input_shape=self.data.image_shape, num_classes=self.data.num_classes
        ).to(self.device)
        self.rule = instantiate(cfg.algorithm, model=self.model)
        self.optimizer = instantiate(cfg.optimizer)(self.model.parameters())
        self.scheduler = instantiate(cfg.scheduler)(self.optimizer)
        self.names = {
            "algorithm": type(self.rule).__name__.lower(),
            "model": type(self.model).__name__.lower(),
            "dataset": getattr(self.data, "name", type(self.data).__name__.lower()),
            **(names or {}),
        }
        resolved = OmegaConf.to_container(cfg, resolve=True)
        self.loggers = [
            instantiate(c, _partial_=True)(
                out_dir=str(self.out_dir), run_config=resolved, names=self.names
            )
            for c in (cfg.get("logger") or {}).values()
            if c is not None
        ]

    def log(self, record: dict) -> None:
        with (self.out_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        for logger in self.loggers:
            logger.log_metrics(record, step=record["step"])

    def fit(self) -> dict:
        """Train; write summary.json and finish every logger, also when training fails."""
        self.summary = {"status": "failed"}
        try:
            self._fit()
            self.summary["status"] = "completed"
        except DivergedError:
            self.summary["status"] = "diverged"
            raise
        finally:
            self.summary.update(self.names, seed=self.cfg.seed)
            (self.out_dir / "summary.json").write_text(json.dumps(self.summary, indent=2) + "\n")
            for logger in self.loggers:
                logger.finish(self.summary)
        return self.summary

    def _fit(self) -> None:
        cfg, data, rule, optimizer = self.cfg.trainer, self.data, self.rule, self.optimizer
        max_steps = cfg.max_steps or float("inf")
        step, epoch, best, last = 0, 0, -1.0, {}
        train_time, train_samples = 0.0, 0
        start = time.perf_counter()
        log.info(
            "%s | %s | %s: %d train samples, %d steps/epoch, device %s",
            *self.names.values(), len(data.train_y), data.steps_per_epoch, self.device,
        )  # fmt: skip
        while epoch < cfg.epochs and step < max_steps:
            epoch += 1
            self.model.train()
            lr = optimizer.param_groups[0]["lr"]
            loss_sum = torch.zeros((), device=self.device)
            n_steps = 0
            t_epoch = time.perf_counter()
            batches = tqdm(
                data.train_batches(), total=data.steps_per_epoch, desc=f"epoch {epoch}",
                leave=False, disable=None if cfg.progress else True,
            )  # fmt: skip
            for x, y in batches:
                optimizer.zero_grad(set_to_none=True)
                out = rule.train_step(x, y)
                if not torch.isfinite(out.loss):
                    raise DivergedError(
                        f"training diverged: loss is {out.loss.item()} at step {step + 1} "
                        f"(epoch {epoch}, lr {lr:g}); lower optimizer.lr"
                    )
                optimizer.step()
                loss_sum += out.loss
                n_steps += 1
                train_samples += len(y)
                step += 1
                if step >= max_steps:
                    break
            train_loss = loss_sum.item() / max(n_steps, 1)  # one sync per epoch
            train_time += time.perf_counter() - t_epoch
            self.scheduler.step()
            last = {
                "epoch": epoch,
                "step": step,
                "train/loss": train_loss,
                **evaluate(self.model, data),
                "lr": lr,
                "time_s": time.perf_counter() - start,
            }
            best = max(best, last["test/acc"])
            self.log(last)
            for callback in self.callbacks:
                callback.on_evaluation(self, last)
            log.info(
                "epoch %d step %d | train/loss %.4f | test/loss %.4f | test/acc %.4f | %.1f s",
                epoch, step, train_loss, last["test/loss"], last["test/acc"], last["time_s"],
            )  # fmt: skip
            self.summary.update(
                self._totals(epoch, step, best, last, start, train_time, train_samples)
            )

    @staticmethod
    def _totals(epoch, step, best, last, start, train_time, train_samples) -> dict:
        return {
            "test/acc": last.get("test/acc"),
            "best/test/acc": best,
            "train/loss": last.get("train/loss"),
            "test/loss": last.get("test/loss"),
            "epochs": epoch,
            "steps": step,
            "wall_s": time.perf_counter() - start,
            "train/samples_per_s": train_samples / train_time if train_time else None,
        }


def train(cfg: DictConfig, out_dir: str | Path, names: dict | None = None, callbacks=()) -> dict:
    """Build everything from ``cfg``, train, write metrics.jsonl and summary.json."""
    return Run(cfg, out_dir, names, callbacks).fit()
