"""Data-parallel training under ``torchrun`` (or ``srun``): one run on N processes ("ranks").

    torchrun --nproc_per_node=2 run.py hydra.run.dir=outputs/my-run <overrides>

torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in each process's environment; without
them (or with ``WORLD_SIZE=1``) nothing here does anything: no process group, no collective, no
cost. With them the trainer (fdfa/train.py) joins the ranks into one process group (gloo on the
CPU, NCCL on GPUs, one GPU per rank: ``cuda:LOCAL_RANK``), and:

- every rank takes its slice of every global batch of ``WORLD_SIZE x dataset.batch_size``
  samples (``dataset.batch_size`` is per rank), from the same epoch shuffle (rank 0's, sent to
  all), so N ranks at batch b take the same steps as one process at batch N b;
- the model and every fixed feedback (DFA's B) are built from ``seed`` on every rank, so they
  start equal; after that each rank draws from its own random stream (``rank_seed``), so FDFA's
  directions differ between ranks (that is what makes the averaged Ĵ_l better) and so do dropout
  masks and augmentations;
- after the rule's step, the forward weights' ``.grad`` are averaged over ranks before the
  optimizer steps (``average_gradients``), as DistributedDataParallel does; the learned feedback
  rules average theirs inside their own step (FDFA's Ĵ_l, DKP's and KP's feedback gradients);
- the step's loss and a stop flag (a SIGINT/SIGTERM to any rank) are agreed over all ranks once a
  step (``agree``): every rank sees the same mean loss and stops after the same step;
- only rank 0 writes the run dir and logs; every collective waits at most
  ``trainer.dist_timeout_s`` seconds, so a dead or stuck rank ends the others with one line.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from fdfa.errors import FdfaError, one_line
from fdfa.interrupt import SignalHandler
from fdfa.runfiles import RunFiles

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600  # trainer.dist_timeout_s when absent


class PeerLost(FdfaError):
    """A collective failed or timed out: another rank died, hung, or was never started."""


@dataclass(frozen=True)
class World:
    """Where this process stands among the ranks of one run (from torchrun's environment)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env(environ=os.environ) -> World:
    """The World that torchrun's ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` describe (one process
    when they are absent)."""
    try:
        size = int(environ.get("WORLD_SIZE", 1))
        rank = int(environ.get("RANK", 0))
        local = int(environ.get("LOCAL_RANK", rank))
    except ValueError:
        raise FdfaError(
            "RANK, WORLD_SIZE and LOCAL_RANK must be integers (torchrun sets them); unset them "
            "to train in one process"
        ) from None
    if size < 1 or not 0 <= rank < size:
        raise FdfaError(f"RANK={rank} does not fit WORLD_SIZE={size}; start ranks with torchrun")
    return World(rank, size, local)


def start(world: World, device: torch.device, timeout_s: float | None) -> torch.device:
    """Join the run's process group (unless one process, or a group the caller made already) and
    return this rank's device: ``cuda:LOCAL_RANK`` when training on GPUs."""
    if not world.active:
        return device
    if device.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise FdfaError(
                f"LOCAL_RANK={world.local_rank} but {torch.cuda.device_count()} GPUs are visible; "
                "start at most one rank per GPU (torchrun --nproc_per_node)"
            )
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s or DEFAULT_TIMEOUT_S)
        backend = "nccl" if device.type == "cuda" else "gloo"
        with collective("joining the process group"):
            dist.init_process_group(backend, timeout=timeout, device_id=_device_id(device))
    if dist.get_world_size() != world.size:
        raise FdfaError(f"the process group has {dist.get_world_size()} ranks, WORLD_SIZE says "
                        f"{world.size}; start the ranks with torchrun")  # fmt: skip
    if not world.is_main:
        quiet_logging()
    return device


def _device_id(device: torch.device):
    return device if device.type == "cuda" else None


def stop(world: World, started_here: bool) -> None:
    """Leave the process group that ``start`` made (a caller's own group stays)."""
    if world.active and started_here and dist.is_initialized():
        dist.destroy_process_group()


class collective:  # noqa: N801 (a context manager, like contextlib's)
    """``with collective("what"):`` turns a failed or timed-out collective into PeerLost: one
    line, naming this rank and the timeout, instead of a C++ backend's traceback."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb) -> bool:
        if err is None or not isinstance(err, (RuntimeError, dist.DistError)):
            return False
        rank = dist.get_rank() if dist.is_initialized() else os.environ.get("RANK", "?")
        raise PeerLost(
            f"rank {rank} stopped while {self.what}: another rank died, hung past "
            f"trainer.dist_timeout_s or never started ({one_line(err, 120)}); rerun the same "
            "torchrun command to resume from last.ckpt"
        ) from None


def quiet_logging() -> None:
    """Ranks other than 0: no run.log lines (rank 0 writes it), warnings only on the console."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()
    root.setLevel(logging.WARNING)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s own random stream, drawn after the model and the feedback are
    built from ``seed`` (rank 0 keeps its stream: a one-process run draws the same)."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def seed_rank(world: World, seed: int) -> None:
    if world.active and not world.is_main:
        torch.manual_seed(rank_seed(seed, world.rank))  # every device's generator too


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def average_gradients(params) -> None:
    """Replace each parameter's ``.grad`` by its mean over the ranks (one all-reduce for all of
    them); parameters without a gradient are left alone (no rank has one for them)."""
    if not active():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        average_(grads)


@torch.no_grad()
def average_(tensors) -> None:
    """Each tensor of ``tensors`` (of one device and dtype) becomes its mean over the ranks, in
    place: a single all-reduce of their concatenation."""
    tensors = list(tensors)
    if not active() or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    with collective("averaging over ranks"):
        dist.all_reduce(flat)
    flat.div_(dist.get_world_size())
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))


SIGNALS = SignalHandler.SIGNALS  # SIGINT, SIGTERM: the signals a run stops on


def agree(loss: torch.Tensor, signum: int | None) -> tuple[torch.Tensor, int | None]:
    """One all-reduce a step: the mean of the ranks' losses, and the signal (if any rank got
    SIGINT or SIGTERM: SIGTERM when both kinds came) after which every rank stops."""
    if not active():
        return loss, signum
    flags = [float(signum == s) for s in SIGNALS]
    both = torch.tensor([loss.item(), *flags], dtype=torch.float64, device=_wire())
    with collective("agreeing on the step's loss"):
        dist.all_reduce(both)
    got = [s for s, n in zip(SIGNALS, both[1:].tolist()) if n > 0]
    mean = (both[0] / dist.get_world_size()).to(loss.device, loss.dtype)
    return mean, (signum or (got[-1] if got else None))


def same_on_all(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``tensor`` on every rank (e.g. the epoch's shuffle)."""
    if not active():
        return tensor
    sent = tensor.to(_wire())
    with collective("receiving the epoch's shuffle"):
        dist.broadcast(sent, src=0)
    return sent.to(tensor.device)


def _wire() -> torch.device:
    """Where the backend's tensors must live: the rank's GPU for NCCL, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_objects(obj) -> list:
    """``obj`` of every rank, by rank (one process: ``[obj]``)."""
    if not active():
        return [obj]
    out = [None] * dist.get_world_size()
    with collective("gathering the ranks' states"):
        dist.all_gather_object(out, obj)
    return out


class QuietRunFiles(RunFiles):
    """The run dir as ranks other than 0 see it: readable (they resume from rank 0's last.ckpt),
    never written."""

    def _nothing(self, *args, **kwargs) -> None:
        return None

    create = record_config = write_records = append_record = _nothing
    write_summary = remove_summary = save_last = save_best = _nothing


def check_batchnorm(model: torch.nn.Module, rule, device: torch.device, sync: bool):
    """``trainer.sync_batchnorm``: under torchrun on GPUs, BatchNorm layers become SyncBatchNorm
    (statistics over the global batch). Returns the model to train. torch's SyncBatchNorm runs
    on GPUs only: on the CPU every rank normalises with its own batch's statistics (a warning).
    The forward-mode rules' tangent code knows BatchNorm, not SyncBatchNorm: refused."""
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if not (active() and sync and has_bn):
        return model
    if device.type != "cuda":
        if dist.get_rank() == 0:
            log.warning("trainer.sync_batchnorm: torch has no SyncBatchNorm on the CPU; each "
                        "rank normalises with its own batch's statistics")  # fmt: skip
        return model
    if getattr(rule, "forward_mode", False):
        raise FdfaError(
            f"{type(rule).__name__}'s forward-mode tangents do not go through SyncBatchNorm; set "
            "trainer.sync_batchnorm=false (each rank's own batch statistics) or use one GPU"
        )
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
