"""Where a run stands (saved in every checkpoint), the per-epoch timing line with its ETA, and a
sweep's overall progress bar with the ETA of all its runs (trials and seed runs)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0  # epochs started
    step: int = 0  # optimizer steps taken
    train_time: float = 0.0  # seconds in training steps (evaluation excluded)
    wall_time: float = 0.0  # seconds of the whole loop, evaluation included
    train_samples: int = 0
    perm: torch.Tensor | None = None  # the current epoch's shuffle; None between epochs
    batch: int = 0  # batches of the current epoch done
    loss_sum: float = 0.0  # sum of this epoch's batch losses so far


def timing_line(times: list[float], epochs_done: int, epochs_left: int) -> str:
    """'epoch 9.8 s, 29.5 s since start, ETA 16m 05s for 97 more epochs' from the evaluation
    records' ``time_s`` so far: the ETA is the mean epoch time (evaluation included) times the
    epochs left."""
    since_start, epoch_s = times[-1], times[-1] - (times[-2] if len(times) > 1 else 0.0)
    text = f"epoch {epoch_s:.1f} s, {since_start:.1f} s since start"
    if epochs_left > 0:
        eta = since_start / epochs_done * epochs_left
        text += f", ETA {clock(eta)} for {epochs_left} more epoch{'s' if epochs_left > 1 else ''}"
    return text


def clock(seconds: float) -> str:
    """'1h 02m', '16m 05s' or '7 s'."""
    whole = round(seconds)
    h, m, sec = whole // 3600, whole // 60 % 60, whole % 60
    return f"{h}h {m:02d}m" if h else f"{m}m {sec:02d}s" if m else f"{sec} s"


def overall_bar(done: int, total: int, elapsed: float, done_here: int, width: int = 24) -> str:
    """'[#########...............] 6/16 runs, 2m 00s, ETA 3m 20s': ``done`` of ``total`` runs
    finished (trials and seed runs, earlier commands' included), ``elapsed`` seconds since this
    command started, in which ``done_here`` of them finished; the ETA is the mean time per run
    finished here times the runs left (a rate over all workers, so it counts their overlap)."""
    done = min(max(done, 0), total)
    filled = round(width * done / total) if total else width
    text = f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} runs, {clock(elapsed)}"
    if done >= total:
        return text + ", all done"
    if done_here < 1:
        return text + ", ETA after the first run"
    return text + f", ETA {clock(elapsed / done_here * (total - done))}"
