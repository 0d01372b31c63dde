"""One job (a trial or a confirmation run) through Hydra's basic launcher, in this process, with
the explicit links of fdfa/sweep_job.py: the ``sweep_job`` overrides and the trainer callbacks
given to the app's task function."""

from __future__ import annotations

import functools
from typing import Any

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra.core.utils import JobReturn, JobStatus

from fdfa.rundir import quote


def link_overrides(
    kind: str, group: str, number: int | None = None, rule: str | None = None
) -> list[str]:
    """The overrides that set a job's ``sweep_job`` node (conf/config.yaml); ``rule``: a
    benchmark's rule (None: not a benchmark)."""
    number_text = "null" if number is None else str(number)
    return [
        f"sweep_job.kind={kind}",
        f"sweep_job.number={number_text}",
        f"sweep_job.group={quote(group)}",
        f"sweep_job.rule={'null' if rule is None else quote(rule)}",
    ]


class JobRunner:
    """Runs one job at a time in this process with the app's task function: Hydra's basic
    launcher, set up per job with the job's trainer callbacks."""

    def __init__(self, hydra_context, config, task_function):
        self.hydra_context, self.config, self.task_function = hydra_context, config, task_function

    def run(self, overrides: list[str], index: int, callbacks=()) -> JobReturn:
        """Run one job with ``overrides`` as job number ``index``; ``callbacks`` go to the task
        function (``fdfa.cli.task(cfg, callbacks)``)."""
        launcher = BasicLauncher()
        task = functools.partial(self.task_function, callbacks=list(callbacks))
        launcher.setup(hydra_context=self.hydra_context, task_function=task, config=self.config)
        (ret,) = launcher.launch([overrides], initial_job_idx=index)
        return ret


def job_result(ret: JobReturn) -> tuple[JobStatus, Any]:
    """(status, the job's return value, or the exception it raised), by public JobReturn API."""
    try:
        return ret.status, ret.return_value  # raises the job's exception when it failed
    except BaseException as err:  # the job's own exception, as it raised it
        return JobStatus.FAILED, err
