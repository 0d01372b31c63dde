"""The training step replayed as one CUDA graph (``trainer.cuda_graph=true``, the default on a GPU).

A step of a small network on a GPU is bound by the CPU: each of its many ops costs a kernel launch
(Python and driver work) that takes longer than the small kernel it launches. A CUDA
graph records the step's kernels once (``rule.train_step`` + ``optimizer.step``, the rule's own
feedback update included) and replays them with a single launch: the same kernels on the same
tensors, so the same math, at a fraction of the CPU cost.

How it stays exact:
- the first ``WARMUP_STEPS`` steps of a process run eagerly (on a side stream, as CUDA's capture
  rules ask), so lazily created state (optimizer moments, cuBLAS handles) exists before capture;
- the gradients are set to None before capture, so the graph writes fresh ones each replay
  instead of accumulating into old ones;
- the batch is copied into the graph's static input tensors before each replay;
- learning rates are Python floats baked into the captured optimizer kernels, so the graph is
  captured again whenever a learning rate changes (once an epoch under the default StepLR); a
  batch of another size (an epoch's last) runs eagerly;
- random numbers drawn in the step (FDFA's, FG-A's, FG-W's perturbations) come from torch's
  graph-safe CUDA generator: fresh on every replay.
Steps that need the gradients between the rule and the optimizer (the alignment metrics) run
eagerly. If a step cannot be captured (an op that reads back to the CPU, say), training warns
once and carries on eagerly.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from functools import cache

import torch

from fdfa.errors import one_line
from fdfa.rules.base import rule_optimizers

log = logging.getLogger(__name__)


class GraphedSteps:
    WARMUP_STEPS = 3

    def __init__(self, rule, optimizer, batch_size: int, enabled: bool):
        self.rule, self.optimizer = rule, optimizer
        self.optimizers = [optimizer, *rule_optimizers(rule).values()]  # the rule's own too
        self.batch_size = batch_size  # only full batches are replayed
        self.enabled = enabled
        self.eager_steps = 0
        self.replays = 0  # steps run by replaying the graph
        self.graph = None
        self.lrs = None  # the learning rates the graph was captured with
        self.side_stream = _warmup_stream(torch.cuda.current_device()) if enabled else None

    def replay(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """Run the whole step on (x, y) by replaying the graph (capturing it first if needed) and
        return the loss; None if this step must run eagerly (then use ``eager()``)."""
        if not self.enabled or self.eager_steps < self.WARMUP_STEPS or len(y) != self.batch_size:
            return None
        lrs = [group["lr"] for opt in self.optimizers for group in opt.param_groups]
        if self.graph is None or lrs != self.lrs:
            try:
                self._capture(x, y)
            except Exception as err:  # noqa: BLE001 (whatever failed: go on eagerly)
                self.enabled, self.graph = False, None
                torch.cuda.synchronize()
                log.warning(
                    "trainer.cuda_graph: the training step could not be captured (%s); "
                    "training goes on without CUDA graphs (trainer.cuda_graph=false "
                    "skips the attempt)",
                    one_line(err, None, typed=True),
                )
                return None
            self.lrs = lrs
        self.x.copy_(x)
        self.y.copy_(y)
        self.graph.replay()
        self.replays += 1
        return self.loss.clone()  # the graph overwrites its output on the next replay

    @contextmanager
    def eager(self):
        """Context for a step run eagerly; the warm-up steps run on a side stream."""
        if not self.enabled or self.eager_steps >= self.WARMUP_STEPS:
            yield
            return
        self.eager_steps += 1
        self.side_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side_stream):
            yield
        torch.cuda.current_stream().wait_stream(self.side_stream)

    def _capture(self, x, y) -> None:
        self.graph = None  # frees the previous graph's memory pool first
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["capturable"] = True  # optimizer state stays on the GPU (read in the graph)
        self.x, self.y = x.clone(), y.clone()
        for p in self.rule.parameters():  # the model's and the rule's (e.g. feedback) gradients:
            p.grad = None  # the graph makes fresh ones each replay, never accumulates into these
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.rule.train_step(self.x, self.y)
            self.optimizer.step()
        self.graph, self.loss = graph, out.loss


@cache
def _warmup_stream(device: int) -> torch.cuda.Stream:
    """One side stream per device for every warm-up (cuBLAS sets up a workspace per stream)."""
    return torch.cuda.Stream(device)
