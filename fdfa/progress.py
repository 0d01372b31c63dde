"""Where a run stands (saved in every checkpoint) and the per-epoch timing line with its ETA."""

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
        eta = round(since_start / epochs_done * epochs_left)
        h, m, sec = eta // 3600, eta // 60 % 60, eta % 60
        clock = f"{h}h {m:02d}m" if h else f"{m}m {sec:02d}s" if m else f"{sec} s"
        text += f", ETA {clock} for {epochs_left} more epoch{'s' if epochs_left > 1 else ''}"
    return text
