"""fdfa's one entry point: the ``fdfa`` console script, and ``python run.py`` in a checkout.

    fdfa                                            # FDFA, FC 2x800, MNIST
    fdfa algorithm=dfa model=cnn optimizer.lr=3e-4
    fdfa -m algorithm=bp,dfa,dkp,fdfa seed=0,1

Configs: conf/ inside the installed package, or the checkout's top-level conf/; every run writes
metrics.jsonl and summary.json into its Hydra run dir, relative to the current directory.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from fdfa.allocator import keep_freed_memory
from fdfa.errors import FdfaError, find_fdfa_error
from fdfa.sweep import assign_job_gpu, job_callbacks, record_machine_gpus
from fdfa.train import train
from fdfa.validate import preflight


def config_dir() -> Path:
    """conf/ shipped inside the package (a wheel), else the checkout's conf/ beside fdfa/."""
    here = Path(__file__).resolve().parent
    return here / "conf" if (here / "conf").is_dir() else here.parent / "conf"


def task(cfg: DictConfig) -> float:
    hc = HydraConfig.get()
    assign_job_gpu(hc)  # a grid job of submitit_local or joblib: GPU job.num mod G
    names = {g: hc.runtime.choices.get(g) for g in ("algorithm", "model", "dataset")}
    try:
        summary = train(cfg, hc.runtime.output_dir, names, callbacks=job_callbacks())
    except Exception as err:
        user_error = find_fdfa_error(err)
        if user_error is None or hc.mode == RunMode.MULTIRUN:
            raise  # a bug shows its traceback; a sweeper records the failed job and goes on
        print(f"error: {user_error}", file=sys.stderr)
        sys.exit(2)
    # What a sweeper maximises: the best validation accuracy (selection on validation data);
    # without a validation set, the last epoch's test accuracy (never the max over epochs).
    best_val = summary["best/val/acc"]
    return summary["selected/test/acc"] if best_val is None else best_val


def main() -> None:
    conf = config_dir()
    try:
        preflight(sys.argv[1:], conf)  # unknown group options, an unwritable run dir: one line
    except FdfaError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    keep_freed_memory()  # no page-fault storms on CPU steps (fdfa/allocator.py)
    if {"-m", "--multirun"} & set(sys.argv[1:]):
        record_machine_gpus()  # for jobs that a local launcher starts from here
    hydra.main(version_base="1.3", config_path=str(conf), config_name="config")(task)()
