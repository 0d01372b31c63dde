"""trainer.resume=latest: a rerun of the same command continues the newest unfinished run of the
same config (Hydra gives the rerun a new run dir)."""

import json
import logging

from omegaconf import OmegaConf

from fdfa.train import train
from tests.helpers import compose_config, synthetic_overrides


def hydra_run(out_dir, *extra):
    """train() into out_dir with the .hydra/config.yaml a Hydra run has."""
    cfg = compose_config(synthetic_overrides("model.width=16", *extra))
    (out_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, out_dir / ".hydra" / "config.yaml")
    return train(cfg, out_dir)


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]


def test_resume_latest_continues_the_newest_unfinished_run_of_this_config(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fdfa.train")
    runs = tmp_path / "outputs" / "fdfa-fc-fake"
    hydra_run(runs / "1-killed", "trainer.epochs=1")
    (runs / "1-killed" / "summary.json").unlink()  # as a killed run leaves it
    hydra_run(runs / "2-finished", "trainer.epochs=1")  # newer, but finished: not resumed
    hydra_run(runs / "3-other-config", "trainer.epochs=1", "optimizer.lr=3e-3")  # newest
    (runs / "3-other-config" / "summary.json").unlink()
    summary = hydra_run(runs / "4-rerun", "trainer.epochs=2", "trainer.resume=latest")
    assert f"resuming from {runs / '1-killed' / 'last.ckpt'}: epoch 1, step 8" in caplog.text
    assert summary["epochs"] == 2 and summary["steps"] == 16
    assert records(runs / "4-rerun")[0] == records(runs / "1-killed")[0]  # epoch 1 not redone


def test_resume_latest_without_an_unfinished_run_starts_fresh(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fdfa.resume")
    summary = hydra_run(tmp_path / "x" / "1", "trainer.max_steps=2", "trainer.resume=latest")
    assert "trainer.resume=latest: no unfinished run of this config; starting fresh" in caplog.text
    assert summary["steps"] == 2
