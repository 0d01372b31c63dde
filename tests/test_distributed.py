"""Data-parallel training under torchrun (fdfa/distributed.py): 2 ranks on the CPU with gloo.

The slow tests start real ranks (``python -m torch.distributed.run --standalone``, 127.0.0.1);
each start imports torch in three processes, about 15-30 s on 2 cores. The fast ones check the
pieces without a process group."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from fdfa import distributed
from fdfa.data import TensorData
from fdfa.errors import FdfaError
from fdfa.rules import FDFA
from fdfa.rundir import RunDirCallback
from fdfa.train import train
from tests.ddp_driver import RULES, fixed_directions, overrides
from tests.helpers import CONF, REPO, compose_config, synthetic_overrides

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def torchrun(script: str, args: list[str], log_dir: Path) -> subprocess.Popen:
    """2 ranks of ``script`` (relative to the checkout); each rank's stderr goes to a file under
    ``log_dir`` (``rank_stderr``), torchrun's own to the Popen's pipe."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "0", "WANDB_MODE": "offline"}
    cmd = [*TORCHRUN, "--log-dir", str(log_dir), "-r", "2", str(REPO / script), *args]
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def rank_stderr(log_dir: Path, rank: int) -> str:
    (path,) = log_dir.glob(f"*/attempt_0/{rank}/stderr.log")
    return path.read_text()


def rank_pids(proc: subprocess.Popen, timeout: float = 120) -> dict[int, int]:
    """rank -> pid of torchrun's workers, once both are started."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = {}
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        for pid in children:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            ranks = [int(e[5:]) for e in env if e.startswith(b"RANK=")]
            found.update({ranks[0]: int(pid)} if ranks else {})
        if len(found) == 2:
            return found
        time.sleep(0.1)
    raise AssertionError("torchrun did not start 2 ranks")


def wait_for_first_epoch(proc: subprocess.Popen, run_dir: Path, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while (
        not (run_dir / "metrics.jsonl").is_file() or not (run_dir / "metrics.jsonl").stat().st_size
    ):
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline, "no epoch finished in time"
        time.sleep(0.05)


def rule_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    """The floating-point tensors of last.ckpt's rule state: weights, feedback, optimizer state."""
    state = torch.load(run_dir / "last.ckpt", weights_only=True)["rule"]
    return {k: v for k, v in state.items() if v.is_floating_point()}


def assert_close_runs(a: Path, b: Path) -> None:
    ta, tb = rule_tensors(a), rule_tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        torch.testing.assert_close(ta[key], tb[key], rtol=1e-4, atol=1e-5, msg=f"{a.name}: {key}")
    la = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(line) for line in (b / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in la] == [r["step"] for r in lb]  # one record per epoch: written once
    for x, y in zip(la, lb):
        assert x["train/loss"] == pytest.approx(y["train/loss"], rel=1e-5)
        assert x["test/acc"] == y["test/acc"]


# ---- without a process group ---------------------------------------------------------------


def test_one_process_is_rank_0_of_1_and_bad_torchrun_variables_are_one_line():
    assert distributed.from_env({}) == distributed.World(0, 1, 0)
    world = distributed.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (world.rank, world.size, world.local_rank, world.active, world.is_main) == (
        3, 4, 1, True, False
    )  # fmt: skip
    with pytest.raises(FdfaError, match="RANK=4 does not fit WORLD_SIZE=4"):
        distributed.from_env({"RANK": "4", "WORLD_SIZE": "4"})
    assert not distributed.active()  # no group: every collective is a no-op
    g = torch.ones(3)
    distributed.average_([g])
    assert distributed.agree(g[0], None) == (g[0], None)


def test_ranks_take_disjoint_slices_of_each_global_batch_of_the_same_shuffle():
    x = torch.arange(20.0).view(20, 1, 1, 1)  # sample i is the number i
    data = [
        TensorData(x, torch.zeros(20), x, torch.zeros(20), 2, batch_size=4, mean=0.0, std=1.0)
        for _ in range(2)
    ]
    perm = torch.randperm(20)
    batches = [list(d.shard(r, 2).train_batches(perm)) for r, d in enumerate(data)]
    assert data[0].steps_per_epoch == 2  # 20 // 8: the last partial global batch is left out
    for step in range(2):
        seen = torch.cat([batches[r][step][0].flatten() for r in range(2)]).long()
        assert seen.tolist() == perm[step * 8 : (step + 1) * 8].tolist()


def test_other_ranks_write_nothing_into_the_run_dir(tmp_path):
    files = distributed.QuietRunFiles(tmp_path / "run")
    files.create()
    files.write_records([{"a": 1}])
    files.append_record({"a": 1})
    files.write_summary({"status": "completed"})
    files.save_last({"x": torch.ones(1)})
    files.save_best({"x": torch.ones(1)})
    files.record_config({"config.yaml": "a: 1\n"})
    assert not (tmp_path / "run").exists()


def test_a_time_named_run_dir_is_refused_under_torchrun(monkeypatch, tmp_path):
    """Each rank would claim a dir of its own (the second one ``<name>-1``)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        hydra_cfg = compose(config_name="config", return_hydra_config=True)
    hydra_cfg.hydra.run.dir = str(tmp_path / "${now:%H-%M-%S}")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(FdfaError, match="under torchrun every rank must write to the same run"):
        RunDirCallback._claim_run_dir(hydra_cfg)
    assert not list(tmp_path.iterdir())  # nothing claimed
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    RunDirCallback._claim_run_dir(hydra_cfg)
    assert len(list(tmp_path.iterdir())) == 1


# ---- 2 ranks under torchrun ----------------------------------------------------------------


@pytest.mark.slow
def test_two_ranks_at_batch_32_take_the_steps_of_one_process_at_batch_64(tmp_path, monkeypatch):
    """BP, DFA, DKP and FDFA (both feedback updates; both ranks' directions fixed, so the one
    process sees both halves' estimates averaged): the same weights, feedback and optimizer
    state after 6 steps over 2 epochs, to float tolerance; the run dir written once."""
    rules = list(RULES)
    ranks = torchrun("tests/ddp_driver.py", [str(tmp_path / "two"), "32", *rules], tmp_path / "l")
    monkeypatch.setattr(FDFA, "draw_perturbations", FDFA.draw_perturbations)  # restored after
    fixed_directions(0, 1)
    for rule in rules:  # the one-process references, while the ranks start
        train(compose_config(overrides(rule, 64)), tmp_path / "one" / rule)
    assert ranks.wait(timeout=300) == 0, ranks.stderr.read()
    for rule in rules:
        assert_close_runs(tmp_path / "two" / rule, tmp_path / "one" / rule)


# DKP (learned feedback, Adam states) on a net without BatchNorm, 64 steps an epoch of 2 x 32
LONG = synthetic_overrides(
    "algorithm=dkp",
    "model.batchnorm=false",
    "dataset.train_size=4160",
    "trainer.device=cpu",
    "trainer.dist_timeout_s=20",
)


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_both_with_last_ckpt_and_a_rerun_resumes_exactly(tmp_path):
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    args = [*LONG, f"hydra.run.dir={run_dir}"]
    ranks = torchrun("run.py", [*args, "trainer.epochs=1000"], logs)
    try:
        wait_for_first_epoch(ranks, run_dir)
        os.kill(rank_pids(ranks)[1], signal.SIGTERM)  # rank 1 only
        assert ranks.wait(timeout=120) != 0
    finally:
        ranks.kill()
    for rank in (0, 1):  # both stopped after the same step, saying so in one line each
        (line,) = rank_stderr(logs, rank).splitlines()
        assert line.startswith("interrupted by SIGTERM at epoch "), line
        assert "resume with: torchrun --nproc_per_node=2 " in line  # the command that resumes
    summary = json.loads((run_dir / "summary.json").read_text())
    at_stop = torch.load(run_dir / "last.ckpt", weights_only=True)["progress"]
    assert summary["status"] == "interrupted" and summary["steps"] == at_stop["step"] > 0
    assert len(torch.load(run_dir / "last.ckpt", weights_only=True)["rank_rng"]) == 1

    # the same command resumes on 2 ranks: the same run as one process at batch 64 straight
    finish = f"trainer.epochs={at_stop['epoch'] + 1}"
    assert torchrun("run.py", [*args, finish], tmp_path / "logs2").wait(timeout=300) == 0
    single = [*LONG, "dataset.batch_size=64", finish]
    train(compose_config(single), tmp_path / "one")
    assert_close_runs(run_dir, tmp_path / "one")


@pytest.mark.slow
def test_a_rank_killed_ends_the_other_within_the_timeout_with_one_line(tmp_path):
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    ranks = torchrun("run.py", [*LONG, "trainer.epochs=1000", f"hydra.run.dir={run_dir}"], logs)
    try:
        wait_for_first_epoch(ranks, run_dir)
        os.kill(rank_pids(ranks)[1], signal.SIGKILL)
        t0 = time.time()
        ranks.wait(timeout=20 + 40)  # trainer.dist_timeout_s=20, and time to exit
        print(f"torchrun ended {time.time() - t0:.1f} s after the kill")
    finally:
        ranks.kill()
    (line,) = rank_stderr(logs, 0).splitlines()
    assert line.startswith("error: rank 0 stopped while ") and "trainer.dist_timeout_s" in line
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "failed"
