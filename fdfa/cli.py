"""fdfa's one entry point: the ``fdfa`` console script, and ``python run.py`` in a checkout.

    fdfa                                            # FDFA, FC 2x800, MNIST
    fdfa algorithm=dfa model=cnn optimizer.lr=3e-4
    fdfa -m algorithm=bp,dfa,dkp,fdfa seed=0,1

Configs: conf/ inside the installed package, or the checkout's top-level conf/; every run writes
metrics.jsonl and summary.json into its Hydra run dir, relative to the current directory.
Exit codes: 0 done, 2 a problem the user can fix (one line on stderr, also in run.log), 130 / 143
stopped by SIGINT / SIGTERM (last.ckpt written: rerun to resume), 1 a bug (a traceback).
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from fdfa.allocator import keep_freed_memory
from fdfa.distributed import from_env
from fdfa.errors import FdfaError, Interrupted, RunDirRefused, machine_refusal, user_errors
from fdfa.gpus import assign_job_gpu, record_machine_gpus
from fdfa.train import train
from fdfa.validate import CONF_DIR, preflight

log = logging.getLogger(__name__)


def task(cfg: DictConfig, callbacks=()) -> float:
    """One job. ``callbacks``: the trainer callbacks a sweeper gives a trial's job (its pruning
    reporter, fdfa/sweep_job.py); a sweeper also sets the job's ``sweep_job`` config node."""
    hc = HydraConfig.get()
    kind = OmegaConf.select(cfg, "sweep_job.kind", default="train")  # or a sweep's trial, confirm
    assign_job_gpu(hc, kind)  # a grid job of submitit_local or joblib: GPU job.num mod G
    names = {g: hc.runtime.choices.get(g) for g in ("algorithm", "model", "dataset")}
    record = {  # .hydra/, as Hydra would write it (conf/config.yaml: hydra.output_subdir: null)
        "config.yaml": OmegaConf.to_yaml(cfg),
        "hydra.yaml": OmegaConf.to_yaml(HydraConfig.instance().cfg),
        "overrides.yaml": OmegaConf.to_yaml(hc.overrides.task),
    }
    single = hc.mode != RunMode.MULTIRUN
    # in a sweep every error propagates: the sweeper records the failed job and goes on
    with user_errors(on_error=to_run_log, active=single):
        try:
            summary = train(cfg, hc.runtime.output_dir, names, callbacks, record)
        except Interrupted as err:
            if single:  # a sweep's trial is handed back by the sweeper instead
                err.how_to_resume = f"resume with: {resume_command(hc)}"
            raise
        except Exception as err:  # a read-only run dir, a model too large: one line, not a bug
            resume = f"resume with: {resume_command(hc)}" if single else "rerun the sweep"
            refused = machine_refusal(err, resume)
            if refused is None:
                raise
            raise refused from err
    if single:  # the last line: where it all went
        log.info("run dir %s (summary.json, metrics.jsonl, checkpoints)", hc.runtime.output_dir)
    # What a sweeper maximises: the best validation accuracy (selection on validation data);
    # without a validation set, the last epoch's test accuracy (never the max over epochs).
    best_val = summary["best/val/acc"]
    return summary["selected/test/acc"] if best_val is None else best_val


def resume_command(hc) -> str:
    """The command that continues this run: the same overrides, the run dir named (a default run
    dir is named by the time it started, so the same command alone would start a new run)."""
    script = sys.argv[0]
    prog = f"python {script}" if Path(script).name == "run.py" else "fdfa"
    world = from_env()
    if world.active:  # the ranks of one run: the same torchrun (srun) command
        per_node = os.environ.get("LOCAL_WORLD_SIZE", world.size)
        nodes = "--nnodes=... " if int(per_node) != world.size else ""
        prog = f"torchrun {nodes}--nproc_per_node={per_node} {script}"
    hydra_args = [
        o for o in hc.overrides.hydra if not o.startswith(("hydra.run.dir=", "hydra.mode="))
    ]
    args = [*hc.overrides.task, *hydra_args, f"hydra.run.dir={hc.runtime.output_dir}"]
    return " ".join([prog, *map(shlex.quote, args)])


def to_run_log(err: BaseException, line: str) -> None:
    """Append ``line`` to the run's log file (run.log) only: stderr gets it once, from us. A
    refused run leaves the run dir (and its run.log) as it was."""
    if isinstance(err, RunDirRefused):
        return
    record = logging.LogRecord("fdfa", logging.ERROR, __file__, 0, line, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def main() -> None:
    conf = CONF_DIR
    if os.getcwd() not in sys.path:  # your own classes (model._target_=mynet.MyNet) from here
        sys.path.insert(1, os.getcwd())
    with user_errors():
        if {"-m", "--multirun"} & set(sys.argv[1:]) and from_env().active:
            raise FdfaError(
                "a sweep under torchrun is not supported: run the sweep without torchrun (one GPU "
                "per trial), or one run per torchrun command"
            )
        preflight(sys.argv[1:], conf)  # unknown group options, an unwritable run dir: one line
    keep_freed_memory()  # no page-fault storms on CPU steps (fdfa/allocator.py)
    logging.raiseExceptions = False  # a full disk must not turn each log line into a traceback
    if {"-m", "--multirun"} & set(sys.argv[1:]):
        record_machine_gpus()  # for jobs that a local launcher starts from here
    with user_errors():  # Interrupted: last.ckpt and summary.json are written; a rerun resumes
        hydra.main(version_base="1.3", config_path=str(conf), config_name="config")(task)()
