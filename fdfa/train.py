"""The training loop: data -> model -> rule -> optimizer -> metrics -> loggers, in one place.

A run resumes by itself: when its run dir holds last.ckpt (written at the end of every epoch and
every ``trainer.ckpt_every_n_steps`` steps), it continues from there, bit for bit on the CPU.
A run holds its run dir's lock for its life; SIGINT/SIGTERM stop it after the step under way,
with last.ckpt written (fdfa/interrupt.py).
"""

from __future__ import annotations

import logging
import random
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from fdfa import checkpoint, distributed
from fdfa.cuda_graph import GraphedSteps
from fdfa.errors import DivergedError, FdfaError, Interrupted, is_disk_full, one_line
from fdfa.interrupt import StopSignals
from fdfa.progress import Progress, timing_line
from fdfa.protocol import evaluation_records, select_epoch
from fdfa.resume import check_compatible, resume_source
from fdfa.rules.base import rule_optimizers
from fdfa.rundir import RunDirLock
from fdfa.runfiles import RunFiles
from fdfa.sweep_job import Pruned
from fdfa.validate import validate_config

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FdfaError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu")
    return torch.device(name)


@torch.inference_mode()
def evaluate(model: torch.nn.Module, data) -> dict:
    """Mean cross-entropy and accuracy (a fraction) over each evaluated set: ``val/loss`` and
    ``val/acc`` when a validation set is held out, then ``test/loss`` and ``test/acc``."""
    model.eval()
    out = {}
    for split, (_, labels) in data.eval_splits().items():
        loss_sum = torch.zeros((), device=labels.device)
        correct = torch.zeros((), device=labels.device, dtype=torch.long)
        for x, y in data.eval_batches(split):
            logits = model(x)
            loss_sum += F.cross_entropy(logits, y, reduction="sum")
            correct += (logits.argmax(1) == y).sum()
        out[f"{split}/loss"] = loss_sum.item() / len(labels)
        out[f"{split}/acc"] = correct.item() / len(labels)
    return out


class Run:
    """One training job, in three steps (torchtune's recipe lifecycle): ``Run(cfg, out_dir)``
    checks the config's values and stores it (nothing built, nothing written); ``setup()`` builds
    data, model, rule, optimizer and metrics, or restores them from a checkpoint; ``fit()`` trains.
    Its files (metrics.jsonl, summary.json, last.ckpt, best.ckpt) are ``self.files``.

    ``record``: files (name -> text) to write into ``<out_dir>/.hydra/`` once the run dir is
    accepted (no checkpoint of another config there): run.py passes Hydra's config.yaml,
    hydra.yaml and overrides.yaml, so a refused attempt leaves the run's own record as it was.
    ``stop``: the StopSignals that train() installed (a SIGINT/SIGTERM ends the run cleanly)."""

    def __init__(
        self,
        cfg: DictConfig,
        out_dir: str | Path,
        names: dict | None = None,
        callbacks=(),
        record: dict[str, str] | None = None,
        stop: StopSignals | None = None,
    ):
        validate_config(cfg)
        self.cfg = cfg
        self.resolved = OmegaConf.to_container(cfg, resolve=True)
        self.world = distributed.from_env()  # torchrun's ranks (one process: rank 0 of 1)
        self.files = RunFiles(out_dir) if self.world.is_main else distributed.QuietRunFiles(out_dir)
        self._agreed_stop = None  # under torchrun: the signal every rank stops after
        self.given_names = names or {}
        # Objects with ``on_evaluation(run, record)``, called after each evaluation is logged; one
        # may raise to end the run (a sweep trial's reporter raises fdfa.sweep_job.Pruned).
        self.callbacks = list(callbacks)
        self.record = record or {}
        self.stop = stop or StopSignals()  # not entered: no handlers, signum stays None
        self.loggers = []  # built when training starts (a finished run starts none)
        self.setup_s: float | None = None  # building (or restoring) and starting the loggers

    def setup(self) -> Run:
        """Build everything from the config, or restore it from the checkpoint to resume from
        (``trainer.resume``); a fresh start empties metrics.jsonl, after moving an earlier run's
        files here to ``previous-<n>/`` (RunFiles.move_aside). Returns the run."""
        cfg, started = self.cfg, time.perf_counter()
        self.files.create()
        checkpoint.remove_stale_temps(self.files.dir)  # left by writers killed mid-write
        resume_from = resume_source(cfg.trainer.get("resume", "auto"), self.files, self.resolved)
        resumed = checkpoint.load(resume_from) if resume_from else None
        if resumed:
            check_compatible(resumed, resume_from, self.resolved)
        own = resume_from is not None and resume_from.resolve() == self.files.last.resolve()
        if not own and self.world.is_main and self.files.holds_run():  # rank 0's files alone
            aside = self.files.move_aside()  # this run's files must not mix with those
            log.warning("an earlier run's files in %s moved to %s", self.files.dir, aside)
        self.files.record_config(self.record)  # the dir is this run's: record its config

        seed_everything(cfg.seed)
        timeout = cfg.trainer.get("dist_timeout_s")
        self.device = distributed.start(self.world, resolve_device(cfg.trainer.device), timeout)
        self.data = instantiate(cfg.dataset)
        self.data.setup(self.device, resize_to=cfg.model.get("input_size"))
        if self.world.active:
            self.data.shard(self.world.rank, self.world.size)
        self.model = instantiate(
            cfg.model, input_shape=self.data.image_shape, num_classes=self.data.num_classes
        ).to(self.device)
        self.rule = instantiate(cfg.algorithm, model=self.model)
        sync_bn = cfg.trainer.get("sync_batchnorm", True)
        self.model = distributed.check_batchnorm(self.model, self.rule, self.device, sync_bn)
        self.optimizer = instantiate(cfg.optimizer)(self.model.parameters())
        self.scheduler = instantiate(cfg.scheduler)(self.optimizer)
        # alignment metrics on the side of training (conf/metrics/); none without a metrics group
        measured = cfg.get("metrics") and self.world.is_main  # rank 0's shard only, logged
        self.metrics = instantiate(cfg.metrics) if measured else None
        distributed.seed_rank(self.world, cfg.seed)  # ranks > 0: their own random stream
        self.graphed = GraphedSteps(
            self.rule,
            self.optimizer,
            batch_size=self.data.batch_size,
            enabled=self.device.type == "cuda"
            and bool(cfg.trainer.get("cuda_graph", True))
            and not self.world.active,  # the ranks' all-reduce sits inside the step
        )
        self.names = {
            "algorithm": type(self.rule).__name__.lower(),
            "model": type(self.model).__name__.lower(),
            "dataset": getattr(self.data, "name", type(self.data).__name__.lower()),
            **self.given_names,
        }
        self.progress = Progress()
        self.records: list[dict] = []
        if resumed:
            self._restore(resumed, resume_from)
        else:
            self.files.write_records([])  # a fresh start: no stale records from an earlier run
        self._setup_started = started
        self._clock = (time.perf_counter(), self.progress.wall_time)
        return self

    def _start_loggers(self) -> None:
        if not self.world.is_main:
            return  # rank 0 logs
        self.loggers = [
            instantiate(c, _partial_=True)(
                out_dir=str(self.files.dir),
                run_config=self.resolved,
                names=self.names,
                resumed=self.progress.step > 0,  # from a checkpoint: its records are replayed
            )
            for c in (self.cfg.get("logger") or {}).values()
            if c is not None
        ]
        for record in self.records:  # a resumed run replays its history to fresh loggers
            for logger in self.loggers:
                logger.log_metrics(record, step=record["step"])

    def wall_time(self) -> float:
        t0, before = self._clock
        return before + time.perf_counter() - t0

    # ---- checkpoints -------------------------------------------------------------------------

    def _optimizers(self) -> dict:
        """The forward optimizer and any optimizer the rule holds (e.g. its feedback's)."""
        held = rule_optimizers(self.rule)
        return {"optimizer": self.optimizer, **{f"rule.{k}": v for k, v in held.items()}}

    def save_checkpoint(self) -> None:
        self.progress.wall_time = self.wall_time()
        rngs = distributed.gather_objects(checkpoint.rng_state())  # one process: its own
        state = {
            "format": checkpoint.FORMAT,
            "config": self.resolved,
            "rule": self.rule.state_dict(),  # the model and the rule's feedback tensors
            "optimizers": {k: opt.state_dict() for k, opt in self._optimizers().items()},
            "scheduler": self.scheduler.state_dict(),
            "rng": rngs[0],
            **({"rank_rng": rngs[1:]} if self.world.active else {}),  # ranks 1.. under torchrun
            "progress": asdict(self.progress),
            "records": self.records,
        }
        self.files.save_last(state)

    def _restore(self, ckpt: dict, path: Path) -> None:
        try:
            self.rule.load_state_dict(ckpt["rule"])
            optimizers = self._optimizers()
            if set(ckpt["optimizers"]) != set(optimizers):
                raise ValueError(f"optimizers {sorted(ckpt['optimizers'])} vs {sorted(optimizers)}")
            for key, opt in optimizers.items():
                opt.load_state_dict(ckpt["optimizers"][key])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            known = {f.name for f in fields(Progress)}  # older checkpoints kept more
            self.progress = Progress(**{k: v for k, v in ckpt["progress"].items() if k in known})
        except (KeyError, RuntimeError, ValueError, TypeError) as err:
            raise FdfaError(
                f"checkpoint {path} does not fit this model and rule ({one_line(err)}); "
                "use a new hydra.run.dir, or trainer.resume=never to start over here"
            ) from None
        self.records = list(ckpt["records"])
        checkpoint.set_rng_state(ckpt["rng"])
        if self.world.active and not self.world.is_main:
            rank_rngs = ckpt.get("rank_rng") or []  # absent or short: saved with fewer ranks
            if self.world.rank <= len(rank_rngs):
                checkpoint.set_rng_state(rank_rngs[self.world.rank - 1])
            else:
                distributed.seed_rank(self.world, self.cfg.seed + self.progress.step)
        # metrics.jsonl holds exactly the checkpoint's records: later ones will be redone
        self.files.write_records(self.records)
        p = self.progress
        log.info("resuming from %s: epoch %d, step %d", path, p.epoch, p.step)

    # ---- training ----------------------------------------------------------------------------

    def log(self, record: dict) -> None:
        self.records.append(record)
        self.files.append_record(record)
        for logger in self.loggers:
            logger.log_metrics(record, step=record["step"])

    def done(self) -> bool:
        p, cfg = self.progress, self.cfg.trainer
        if p.perm is not None:  # an epoch is under way
            return False
        return p.epoch >= cfg.epochs or p.step >= self._max_steps()

    def fit(self) -> dict:
        """Train; write summary.json and finish every logger, also when training fails or is
        interrupted (status ``interrupted``, after last.ckpt was written)."""
        if self.done():
            log.info("run in %s already finished; nothing to do", self.files.dir)
            summary = {"status": "completed", **self._totals(), **self.names, "seed": self.cfg.seed}
            self.files.write_summary(summary)
            return summary
        summary = {"status": "failed"}
        with self.stop.deferred():  # a signal now only sets stop.signum; the loop stops on it
            try:
                self._start_loggers()  # a W&B without its server may wait here a while:
                self.setup_s = time.perf_counter() - self._setup_started  # not time_s, wall_s
                self._clock = (time.perf_counter(), self.progress.wall_time)
                self._fit()
                summary["status"] = "completed"
            except BaseException as err:
                if isinstance(err, DivergedError):
                    summary["status"] = "diverged"
                elif isinstance(err, KeyboardInterrupt):  # Interrupted, or a Ctrl-C unhandled
                    summary["status"] = "interrupted"
                elif isinstance(err, Pruned):  # raised by a sweep trial's reporter
                    summary["status"] = "pruned"
                self._finish(summary, failing=True)  # never masks err
                if isinstance(err, Exception) and is_disk_full(err):
                    if not isinstance(err, FdfaError):  # e.g. a logger's file
                        raise checkpoint.disk_full(self.files.dir) from None
                raise
            self._finish(summary, failing=False)  # a signal now: the run is complete anyway
        return summary

    def _finish(self, summary: dict, failing: bool) -> None:
        """summary.json, then every logger's finish. While another error propagates, a summary
        that cannot be written only logs a warning (and removes a stale summary.json)."""
        summary.update(self._totals(), **self.names, seed=self.cfg.seed)
        try:
            self.files.write_summary(summary)
        except Exception as err:
            if not failing:
                raise
            log.warning("summary.json not written (%s)", one_line(err))
            self.files.remove_summary()  # it would tell an old story
        for logger in self.loggers:
            logger.finish(summary)

    def _fit(self) -> None:
        p, data = self.progress, self.data
        log.info(
            "%s | %s | %s: %d train samples, %d steps/epoch, device %s",
            *self.names.values(),
            len(data.train_y),
            data.steps_per_epoch,
            self.device,
        )
        while not self.done():
            if p.perm is None:  # a new epoch
                p.epoch += 1
                perm = distributed.same_on_all(data.epoch_permutation())  # rank 0's on all
                p.perm, p.batch, p.loss_sum = perm, 0, 0.0
            self._train_epoch()
            stopped_mid_epoch = p.batch < data.steps_per_epoch and p.step < self._max_steps()
            if self._stop_signal() and stopped_mid_epoch:
                self.save_checkpoint()  # mid-epoch: a rerun continues with the next batch
                self._interrupted()
            self._end_epoch()  # writes last.ckpt
            if self._stop_signal(agree=True) and not self.done():
                self._interrupted()

    def _max_steps(self) -> float:
        return self.cfg.trainer.max_steps or float("inf")

    def _stop_signal(self, agree: bool = False) -> int | None:
        """The signal to stop on. Under torchrun, the one the ranks agreed on at the last step
        (``agree``: agree now), so that every rank stops after the same step."""
        if not self.world.active:
            return self.stop.signum
        if agree:
            local = self.stop.signum or self._agreed_stop
            _, self._agreed_stop = distributed.agree(torch.zeros(()), local)
        return self._agreed_stop

    def _interrupted(self):
        p, signum = self.progress, self._stop_signal()
        name = signal.Signals(signum).name
        log.warning("%s: stopped at epoch %d, step %d; last.ckpt written", name, p.epoch, p.step)
        raise Interrupted(
            signum,
            f"interrupted by {name} at epoch {p.epoch}, step {p.step}: last.ckpt saved in "
            f"{self.files.dir}",
        )

    # Checking a loss for NaN/inf reads it back from the device. On the CPU that is free, so every
    # step is checked; on a GPU it would stall the queue of kernels each step, so the losses stay
    # on the device and are checked every LOSS_CHECK_EVERY steps and before any metrics,
    # checkpoint or evaluation. Either way the error names the first step whose loss diverged.
    LOSS_CHECK_EVERY = {"cpu": 1, "cuda": 100}

    def _train_epoch(self) -> None:
        """The rest of the current epoch (all of it, unless resumed mid-epoch or capped)."""
        p, cfg, rule, optimizer = self.progress, self.cfg.trainer, self.rule, self.optimizer
        max_steps = self._max_steps()
        ckpt_every = cfg.get("ckpt_every_n_steps") or 0
        check_every = self.LOSS_CHECK_EVERY.get(self.device.type, 1)
        unchecked: list[torch.Tensor] = []  # losses of the steps since the last check
        # float64: sums of float32 losses are then exact, so an epoch split by a checkpoint or a
        # signal and resumed gives the same train/loss as one run straight through
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        self.model.train()
        t0 = time.perf_counter()
        batches = tqdm(
            self.data.train_batches(p.perm, start=p.batch),
            desc=f"epoch {p.epoch}/{cfg.epochs}",
            total=self.data.steps_per_epoch,
            initial=p.batch,
            leave=False,
            disable=None if cfg.progress else True,
        )
        for x, y in batches:
            measure = self.metrics is not None and self.metrics.due(p.step + 1)
            loss = None if measure else self.graphed.replay(x, y)  # the whole step, or None
            if loss is not None:
                unchecked.append(loss)
            else:  # eager: the rule fills .grad, the optimizer steps
                with self.graphed.eager():
                    used = self.metrics.feedback_before_step(rule) if measure else None  # its B
                    optimizer.zero_grad(set_to_none=True)
                    loss = rule.train_step(x, y).loss
                    if self.world.active:  # the ranks' mean loss, and whether any got a signal
                        loss, self._agreed_stop = distributed.agree(loss, self.stop.signum)
                    unchecked.append(loss)
                    if measure or len(unchecked) >= check_every:  # before the weights change
                        loss_sum += self._check_losses(unchecked, p.step + 1)
                    if measure:
                        t_metrics = time.perf_counter()
                        measured = self.metrics.measure(rule, x, y, used)  # .grad: its update
                        self.log({"epoch": p.epoch, "step": p.step + 1, **measured})
                        t0 += time.perf_counter() - t_metrics  # out of train/samples_per_s
                    distributed.average_gradients(self.model.parameters())  # under torchrun
                    optimizer.step()
            if len(unchecked) >= check_every:
                loss_sum += self._check_losses(unchecked, p.step + 1)
            p.batch += 1
            p.step += 1
            p.train_samples += len(y) * self.world.size  # every rank's
            if ckpt_every and p.step % ckpt_every == 0:
                loss_sum += self._check_losses(unchecked, p.step)
                p.loss_sum += loss_sum.item()
                loss_sum.zero_()
                p.train_time += time.perf_counter() - t0
                t0 = time.perf_counter()
                self.save_checkpoint()
            if p.step >= max_steps or self._stop_signal():  # a signal: stop after this step
                break
        loss_sum += self._check_losses(unchecked, p.step)
        p.loss_sum += loss_sum.item()  # one sync per epoch
        p.train_time += time.perf_counter() - t0

    def _check_losses(self, losses: list[torch.Tensor], last_step: int) -> torch.Tensor:
        """Raise DivergedError at the first non-finite loss among ``losses`` (the steps up to
        ``last_step``); else return their sum (on the device). Empties ``losses``."""
        if not losses:
            return torch.zeros((), device=self.device, dtype=torch.float64)
        stacked = torch.stack(losses)
        first_step = last_step - len(losses) + 1
        losses.clear()
        finite = torch.isfinite(stacked)
        if not finite.all():
            i = int((~finite).nonzero()[0])
            lr = self.optimizer.param_groups[0]["lr"]
            feedback = " (or algorithm.feedback_lr)" if "feedback_lr" in self.cfg.algorithm else ""
            raise DivergedError(
                f"training diverged: loss is {stacked[i].item()} at step {first_step + i} "
                f"(epoch {self.progress.epoch}, lr {lr:g}); lower optimizer.lr{feedback}"
            )
        return stacked.double().sum()

    def _end_epoch(self) -> None:
        p = self.progress
        record = {
            "epoch": p.epoch,
            "step": p.step,
            "train/loss": p.loss_sum / max(p.batch, 1),
            **evaluate(self.model, self.data),
            "lr": self.optimizer.param_groups[0]["lr"],
            "time_s": self.wall_time(),
        }
        self.scheduler.step()
        p.perm, p.batch, p.loss_sum = None, 0, 0.0
        self.log(record)
        if select_epoch(self.records)["best/epoch"] == p.epoch:
            self.save_best(record)  # before last.ckpt: a resume redoes this epoch and rewrites it
        self.save_checkpoint()
        val = f" | val/acc {record['val/acc']:.4f}" if "val/acc" in record else ""
        log.info(
            "epoch %d step %d | train/loss %.4f%s | test/acc %.4f | %s",
            p.epoch,
            p.step,
            record["train/loss"],
            val,
            record["test/acc"],
            self._timing(),
        )
        for callback in self.callbacks:
            callback.on_evaluation(self, record)

    def _timing(self) -> str:
        p, cfg = self.progress, self.cfg.trainer
        left = cfg.epochs - p.epoch
        if cfg.max_steps:
            left = min(left, -(-(cfg.max_steps - p.step) // self.data.steps_per_epoch))
        return timing_line([r["time_s"] for r in evaluation_records(self.records)], p.epoch, left)

    def save_best(self, record: dict) -> None:
        """best.ckpt: the model and rule state of the selected epoch (the best val/acc so far;
        the latest epoch when there is no validation set), with that epoch's record."""
        state = {
            "format": checkpoint.FORMAT,
            "config": self.resolved,
            "rule": self.rule.state_dict(),
            "record": record,
        }
        self.files.save_best(state)

    def _data_root(self) -> str | None:
        """The data folder this run read, absolute (None for data made in memory)."""
        root = self.resolved.get("dataset", {}).get("root")
        return str(Path(root).expanduser().resolve()) if root else None

    def _totals(self) -> dict:
        evaluations = evaluation_records(self.records)
        p, last = self.progress, (evaluations[-1] if evaluations else {})
        return {
            "test/acc": last.get("test/acc"),  # the last epoch's
            **select_epoch(self.records),  # best/val/acc, best/epoch, selected/test/acc
            "train/loss": last.get("train/loss"),
            "test/loss": last.get("test/loss"),
            "epochs": p.epoch - (p.perm is not None),  # finished (a stop mid-epoch: not that one)
            "steps": p.step,
            "wall_s": p.wall_time,
            "setup_s": self.setup_s,  # this session's, before its first step (not in wall_s)
            "train/samples_per_s": p.train_samples / p.train_time if p.train_time else None,
            "device": str(self.device),  # s / epoch and samples / s mean little without it
            "data_root": self._data_root(),  # where the data came from (config.yaml keeps ${...})
            # optimistic: the max over epochs is chosen on the test set itself (not for comparing)
            "best/test/acc": max((r["test/acc"] for r in evaluations), default=None),
        }


def train(
    cfg: DictConfig,
    out_dir: str | Path,
    names: dict | None = None,
    callbacks=(),
    record: dict[str, str] | None = None,
) -> dict:
    """Build everything from ``cfg``, train, write metrics.jsonl and summary.json; holding the
    run dir's lock (a live run there: RunDirRefused) and stopping cleanly on SIGINT/SIGTERM
    (Interrupted, after last.ckpt and summary.json are written)."""
    world = distributed.from_env()  # under torchrun: rank 0 holds the lock and writes the dir
    own_group = world.active and not torch.distributed.is_initialized()
    try:
        with RunDirLock(out_dir) if world.is_main else nullcontext(), StopSignals() as stop:
            run = Run(cfg, out_dir, names, callbacks, record=record, stop=stop)
            run.setup()
            return run.fit()
    finally:
        distributed.stop(world, started_here=own_group)
