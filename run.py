"""fdfa's one entry point.

    python run.py                                   # FDFA, FC 2x800, MNIST
    python run.py algorithm=dfa model=cnn optimizer.lr=3e-4
    python run.py -m algorithm=bp,dfa,dkp,fdfa seed=0,1

Config lives in conf/; every run writes metrics.jsonl and summary.json into its Hydra run dir.
"""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from fdfa.allocator import keep_freed_memory
from fdfa.errors import FdfaError, find_fdfa_error
from fdfa.sweep import job_callbacks
from fdfa.train import train
from fdfa.validate import preflight


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    hc = HydraConfig.get()
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


if __name__ == "__main__":
    try:
        preflight(sys.argv[1:])  # unknown group options, an unwritable run dir: one line, exit 2
    except FdfaError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    keep_freed_memory()  # no page-fault storms on CPU steps (fdfa/allocator.py)
    main()
