"""Nothing lost under concurrency, preemption and full disks; a user's mistake is one line.

Real processes where the failure is about processes (two runs launched together, SIGTERM, three
runs in the same second, a full tmpfs); in-process where a signal or a full disk can be made
exactly at one step."""

import errno
import gzip
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torchvision

from fdfa import checkpoint
from fdfa.data import TorchvisionData
from fdfa.errors import DiskFullError, FdfaError, Interrupted
from fdfa.rules import FDFA
from fdfa.train import train
from tests.helpers import REPO, compose_config, mnist_raw, run_cli, synthetic_overrides


def records(run_dir):
    """metrics.jsonl without the wall-clock field (the only thing a resume may change)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "time_s"} for line in lines]


def one_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


def snapshot(run_dir) -> dict:
    """Every file under run_dir (relative path -> bytes)."""
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file()
    }


def weights(run_dir):
    return torch.load(run_dir / "last.ckpt", weights_only=True)["rule"]


def popen(args, cwd=REPO):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "0"}
    return subprocess.Popen(
        [sys.executable, str(REPO / "run.py"), *args],
        cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


# ---- 1. one run per run dir; 3. SIGTERM ------------------------------------------------------

# 64 steps per epoch, so a signal mostly lands mid-epoch
SLOW = synthetic_overrides("model.width=64", "dataset.train_size=2112", "trainer.device=cpu")


@pytest.mark.slow
def test_two_runs_launched_into_one_dir_then_sigterm_and_rerun_match_an_uninterrupted_run(
    tmp_path,
):
    run_dir = tmp_path / "run"
    forever = [*SLOW, "trainer.epochs=100000", f"hydra.run.dir={run_dir}"]
    procs = {seed: popen([*forever, f"seed={seed}"]) for seed in (0, 1)}  # launched together
    try:
        deadline = time.time() + 240
        while all(p.poll() is None for p in procs.values()) and time.time() < deadline:
            time.sleep(0.05)
        refused = next(s for s, p in procs.items() if p.poll() is not None)
        winner = 1 - refused
        assert procs[refused].wait() == 2
        line = one_line(procs[refused].stderr.read())
        assert f"run dir {run_dir} is in use by a live run (pid {procs[winner].pid} on " in line
        assert "give this run its own hydra.run.dir" in line
        while not (run_dir / "last.ckpt").exists():  # epoch 1 done: training is under way
            assert procs[winner].poll() is None, procs[winner].stderr.read()
            time.sleep(0.05)
        procs[winner].send_signal(signal.SIGTERM)
        assert procs[winner].wait(timeout=120) == 143  # 128 + SIGTERM
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    line = one_line(procs[winner].stderr.read())
    assert line.startswith("interrupted by SIGTERM at epoch ")
    assert f"last.ckpt saved in {run_dir}; resume with: python " in line
    assert line.endswith(f"hydra.run.dir={run_dir}")

    # the record is the winner's alone: its config, its seed, its records in order
    assert f"seed: {winner}\n" in (run_dir / ".hydra" / "config.yaml").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["seed"] == winner
    at_stop = checkpoint.load(run_dir / "last.ckpt")["progress"]
    assert summary["steps"] == at_stop["step"] > 0
    epochs = [r["epoch"] for r in records(run_dir)]
    assert epochs == list(range(1, len(epochs) + 1))
    print(f"stopped at epoch {at_stop['epoch']}, batch {at_stop['batch']} (64 per epoch)")
    assert sorted(os.listdir(run_dir)) == sorted(
        [".hydra", ".lock", "best.ckpt", "last.ckpt", "metrics.jsonl", "run.log", "summary.json"]
    )  # no temp file left behind

    # the rerun (the lock died with its process) finishes as if never stopped
    finish = [*SLOW, f"seed={winner}", f"trainer.epochs={at_stop['epoch'] + 1}"]
    train(compose_config(finish), run_dir)
    train(compose_config(finish), tmp_path / "straight")
    assert records(run_dir) == records(tmp_path / "straight")
    a, b = weights(run_dir), weights(tmp_path / "straight")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigint_finishes_the_step_writes_last_ckpt_and_resumes_bit_exact(tmp_path, monkeypatch):
    overrides = synthetic_overrides("trainer.epochs=3")  # 8 steps per epoch
    train(compose_config(overrides), tmp_path / "straight")
    before = signal.getsignal(signal.SIGINT)
    real_step, calls = FDFA.train_step, {"n": 0}

    def ctrl_c_in_step_11(self, x, y):
        calls["n"] += 1
        if calls["n"] == 11:
            os.kill(os.getpid(), signal.SIGINT)  # handled at once, in this (main) thread
        return real_step(self, x, y)

    monkeypatch.setattr(FDFA, "train_step", ctrl_c_in_step_11)
    with pytest.raises(Interrupted) as err:
        train(compose_config(overrides), tmp_path / "run")
    assert err.value.exit_code == 130 and err.value.signal_name == "SIGINT"
    assert "interrupted by SIGINT at epoch 2, step 11" in str(err.value)
    assert signal.getsignal(signal.SIGINT) is before  # the previous handler is back
    saved = checkpoint.load(tmp_path / "run" / "last.ckpt")["progress"]
    assert saved["step"] == 11 and saved["batch"] == 3  # step 11 finished, nothing after it
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps"] == 11

    monkeypatch.setattr(FDFA, "train_step", real_step)
    assert train(compose_config(overrides), tmp_path / "run")["status"] == "completed"
    assert records(tmp_path / "run") == records(tmp_path / "straight")
    a, b = weights(tmp_path / "run"), weights(tmp_path / "straight")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_signal_stops_at_once_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    real_step, calls = FDFA.train_step, {"n": 0}

    def two_sigterms_in_step_11(self, x, y):
        calls["n"] += 1
        if calls["n"] == 11:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)  # raises here, mid-step
        return real_step(self, x, y)

    monkeypatch.setattr(FDFA, "train_step", two_sigterms_in_step_11)
    with pytest.raises(Interrupted, match="a second time") as err:
        train(compose_config(synthetic_overrides("trainer.epochs=3")), tmp_path)
    assert err.value.exit_code == 143
    assert checkpoint.load(tmp_path / "last.ckpt")["progress"]["step"] == 8  # epoch 1's
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "interrupted"


# ---- 1. default run dirs never collide ----------------------------------------------------


@pytest.mark.slow
def test_runs_started_together_with_a_time_named_dir_each_get_their_own(tmp_path):
    """${now:%Y} makes the three collide for sure; the default ${now:%Y-%m-%d_%H-%M-%S} is
    claimed the same way (created exclusively, else <name>-1, <name>-2...)."""
    args = [
        *synthetic_overrides("model.width=64", "trainer.max_steps=2"),
        "hydra.run.dir=out/r-${now:%Y}",
    ]
    procs = [popen([*args, f"seed={seed}"], cwd=tmp_path) for seed in (0, 1, 2)]
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read()
    dirs = sorted((tmp_path / "out").iterdir())
    assert [d.name for d in dirs] == [f"r-{time.strftime('%Y')}{s}" for s in ("", "-1", "-2")]
    seeds = sorted(json.loads((d / "summary.json").read_text())["seed"] for d in dirs)
    assert seeds == [0, 1, 2]
    for d in dirs:  # each record is its own run's
        seed = json.loads((d / "summary.json").read_text())["seed"]
        assert f"seed: {seed}\n" in (d / ".hydra" / "config.yaml").read_text()
        assert f"dir: {d.relative_to(tmp_path)}\n" in (d / ".hydra" / "hydra.yaml").read_text()


# ---- 2. a refused resume leaves the run dir as it was ------------------------------------


@pytest.mark.slow
def test_refused_resume_leaves_every_file_of_the_run_dir_as_it_was(tmp_path):
    record = {"config.yaml": "the run's own config\n", "overrides.yaml": "- its overrides\n"}
    train(compose_config(synthetic_overrides("trainer.epochs=1")), tmp_path, record=record)
    (tmp_path / "run.log").write_text("the run's log\n")
    before = snapshot(tmp_path)
    assert before[".hydra/config.yaml"] == b"the run's own config\n"

    res = run_cli([*synthetic_overrides("optimizer.lr=1e-3"), f"hydra.run.dir={tmp_path}"])
    assert res.returncode == 2
    assert "belongs to another config (optimizer.lr: 0.0001" in one_line(res.stderr)
    assert snapshot(tmp_path) == before  # .hydra/*, run.log, checkpoints, records: byte for byte


# ---- 4. a full disk ----------------------------------------------------------------------


def test_disk_full_in_process_one_error_no_temp_files_previous_checkpoint_intact(
    tmp_path, monkeypatch
):
    train(compose_config(synthetic_overrides("trainer.epochs=1")), tmp_path)
    good = (tmp_path / "last.ckpt").read_bytes()
    real_write_text = checkpoint.write_text_atomic

    def save_on_a_full_disk(obj, f):  # as torch.save reports ENOSPC: a RuntimeError after it
        f.write(good[: len(good) // 2])
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672]")  # noqa: B904

    def summary_on_a_full_disk(path, text):
        if path.name == "summary.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write_text(path, text)

    monkeypatch.setattr(checkpoint.torch, "save", save_on_a_full_disk)
    monkeypatch.setattr(checkpoint, "write_text_atomic", summary_on_a_full_disk)
    with pytest.raises(DiskFullError) as err:  # the first error, not the summary's
        train(compose_config(synthetic_overrides("trainer.epochs=2")), tmp_path)
    message = str(err.value)
    start = rf"no space left in {re.escape(str(tmp_path))} \(writing (best|last)\.ckpt needs about "
    assert re.match(start, message), message
    assert "MB free); free some space" in message and "rerun the same command" in message
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
    assert (tmp_path / "last.ckpt").read_bytes() == good
    assert not (tmp_path / "summary.json").exists()  # epoch 1's would tell an old story


def _unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0
    except OSError:
        return False


DISK_FULL_DRIVER = textwrap.dedent(
    """
    import json, os, shutil, subprocess, sys
    mnt, out, run_py, args = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", mnt], check=True)
    run_dir = os.path.join(mnt, "run")
    cmd = [sys.executable, run_py, *args, "hydra.run.dir=" + run_dir]
    first = subprocess.run([*cmd, "trainer.epochs=1"], capture_output=True, text=True)
    ckpt = open(os.path.join(run_dir, "last.ckpt"), "rb").read()
    with open(os.path.join(mnt, "filler"), "wb") as f:  # leave 64 kB: less than last.ckpt
        f.write(bytes(shutil.disk_usage(mnt).free - 64 * 1024))
    second = subprocess.run([*cmd, "trainer.epochs=2"], capture_output=True, text=True)
    summary = os.path.join(run_dir, "summary.json")
    json.dump({
        "first": [first.returncode, first.stderr],
        "second": [second.returncode, second.stderr],
        "files": sorted(os.listdir(run_dir)),
        "ckpt_intact": open(os.path.join(run_dir, "last.ckpt"), "rb").read() == ckpt,
        "summary": open(summary).read() if os.path.exists(summary) else None,
        "run_dir": run_dir,
    }, open(out, "w"))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not _unshare_works(), reason="cannot mount a tmpfs: no user namespaces here")
def test_disk_full_on_a_real_tmpfs_is_one_line_and_loses_nothing(tmp_path):
    (tmp_path / "mnt").mkdir()
    (tmp_path / "driver.py").write_text(DISK_FULL_DRIVER)
    args = synthetic_overrides("model.width=64")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "0"}
    subprocess.run(
        ["unshare", "-rm", sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "mnt"),
         str(tmp_path / "out.json"), str(REPO / "run.py"), *args],
        check=True, env=env, cwd=REPO, timeout=600,
    )  # fmt: skip
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["first"][0] == 0, out["first"][1]
    assert out["second"][0] == 2
    line = one_line(out["second"][1])
    assert line.startswith(f"error: no space left in {out['run_dir']} (writing last.ckpt needs ")
    assert " MB free); free some space" in line
    assert out["ckpt_intact"]  # the previous checkpoint, byte for byte
    assert not [f for f in out["files"] if f.endswith(".tmp")]  # nothing left filling the disk
    assert json.loads(out["summary"])["status"] == "failed"  # whole, not 0 bytes


# ---- 7. data that lies --------------------------------------------------------------------

MNIST_RAW = mnist_raw()
needs_mnist = pytest.mark.skipif(not MNIST_RAW.is_dir(), reason=f"real MNIST not at {MNIST_RAW}")


def mnist_copy(root, swap=None, truncate=None):
    """root/MNIST/raw with links to the real archives (never to extracted files: a test writes
    those); ``swap``: two names exchanged; ``truncate``: a name copied with half its bytes."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    names = {f.name: f.name for f in MNIST_RAW.glob("*.gz")}
    if swap:
        names[swap[0]], names[swap[1]] = swap[1], swap[0]
    for name, source in names.items():
        if name == truncate:
            data = (MNIST_RAW / source).read_bytes()
            (raw / name).write_bytes(data[: len(data) // 2])
        else:
            os.symlink(MNIST_RAW / source, raw / name)
    return raw


def refusal(root) -> str:
    """The one-line message with which TorchvisionData refuses the MNIST under ``root``."""
    with pytest.raises(FdfaError) as err:
        TorchvisionData("mnist", str(root))
    return str(err.value)


@pytest.fixture
def offline(monkeypatch):
    """No download can succeed (a refused local port), whatever this machine's network."""
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])


@needs_mnist
def test_truncated_archive_is_named_with_what_to_do(tmp_path, offline):
    raw = mnist_copy(tmp_path, truncate="train-images-idx3-ubyte.gz")
    message = refusal(tmp_path)
    assert message.startswith(f"{raw / 'train-images-idx3-ubyte.gz'} is corrupt or truncated (")
    assert "not torchvision's f68b3c2dcbeaaa9fbdd348bbdeb94873): delete it" in message
    assert "(downloading a new copy failed: Error downloading train-images" in message


@needs_mnist
def test_swapped_label_archives_are_named(tmp_path, offline):
    raw = mnist_copy(tmp_path, swap=("train-labels-idx1-ubyte.gz", "t10k-labels-idx1-ubyte.gz"))
    assert refusal(tmp_path).startswith(
        f"{raw / 'train-labels-idx1-ubyte.gz'} holds t10k-labels-idx1-ubyte.gz (its MD5): the "
        "archives are swapped or misnamed"
    )


@needs_mnist
def test_swapped_extracted_label_files_never_train(tmp_path):
    """torchvision reads extracted files without checking them: train images would get test
    labels (the first 10000 pairs, silently)."""
    raw = mnist_copy(tmp_path)
    for split, other in (("train", "t10k"), ("t10k", "train")):
        with gzip.open(MNIST_RAW / f"{other}-labels-idx1-ubyte.gz") as f:
            (raw / f"{split}-labels-idx1-ubyte").write_bytes(f.read())
    assert refusal(tmp_path).startswith(
        f"{raw / 'train-labels-idx1-ubyte'} holds 10000 items, not 60000: it is another split's "
        "file (train and test swapped or misnamed); delete it"
    )


@pytest.mark.slow
@needs_mnist
def test_cli_corrupt_archive_offline_is_one_line_and_in_run_log(tmp_path):
    raw = mnist_copy(tmp_path / "data", truncate="t10k-labels-idx1-ubyte.gz")
    run_dir = tmp_path / "run"
    res = run_cli(
        [f"dataset.root={tmp_path / 'data'}", "dataset.download=false", f"hydra.run.dir={run_dir}"]
    )
    assert res.returncode == 2
    line = one_line(res.stderr)
    assert line.startswith(f"error: {raw / 't10k-labels-idx1-ubyte.gz'} is corrupt or truncated")
    assert line in (run_dir / "run.log").read_text()  # the run dir says why it stopped


# ---- 8. smaller holes ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, key",
    [
        ([], "hydra.run.dir"),  # the default outputs/<...>/${now:...}
        (["hydra.run.dir=outputs/x/${now:%Y}"], "hydra.run.dir"),
        (["-m", "hydra.sweep.dir=outputs/${now:%Y}"], "hydra.sweep.dir"),
    ],
)
def test_unwritable_output_dir_behind_an_interpolation_is_one_line(tmp_path, args, key):
    (tmp_path / "outputs").write_text("a file where the output folder should be")
    res = run_cli([*args, *synthetic_overrides("trainer.max_steps=1")], cwd=tmp_path)
    assert res.returncode == 2
    line = one_line(res.stderr)
    assert line.startswith(f"error: {key} outputs/") and "is not a writable folder" in line
    assert f"choose another with {key}=..." in line
