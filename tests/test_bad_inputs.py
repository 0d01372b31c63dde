"""Bad inputs of issue 32 ("tracebacks or unclear lines"): each is refused with one ``error:``
line that says what to do, exit code 2, and where it can be, before anything is built or written.

In-process for the check itself (fast); one command each (slow) for the line the user sees."""

import contextlib
import gzip
import os
import shlex
import subprocess

import pytest
import torch

from fdfa.data import TensorData, TorchvisionData, check_labels
from fdfa.errors import FdfaError, OptionError, RunDirRefused, machine_refusal
from fdfa.loggers import WandbLogger
from fdfa.train import train
from fdfa.validate import preflight, validate_config
from tests.helpers import (
    REPO,
    PrototypeData,
    compose_config,
    mnist_raw,
    run_cli,
    synthetic_overrides,
)

# ---- refused before anything is built: the config layer ---------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["scheduler.step_size=0"],
         "scheduler.step_size must be an integer >= 1, got 0; e.g. scheduler.step_size=1"),
        (["~trainer.epochs"],
         "trainer.epochs is missing and a run needs it: remove ~trainer.epochs from the command"),
        (["~seed"], "seed is missing and a run needs it: remove ~seed from the command"),
        (["dataset.std=0"], "dataset.std must be a finite number > 0 or a list of them, one a "
         "channel, got 0; e.g. dataset.std=0.5"),
        (["dataset.std=[0.5,0.0,0.5]"], "dataset.std must be a finite number > 0 or a list"),
        (["dataset.mean=[0.1,nan]"], "dataset.mean must be a finite number or a list of them"),
        (["dataset.image_shape=[3,0,0]"], "dataset.image_shape must be three integers >= 1 "
         "(channels, height, width), got [3, 0, 0]; e.g. dataset.image_shape=[3,32,32]"),
        (["dataset.image_shape=[8,8]"], "dataset.image_shape must be three integers >= 1"),
        (["model.width=1e12"], "model.width must be null or an integer >= 1, got 1000000000000.0"),
        (["experiment=cifar10_resnet20", "optimizer=adam"],  # the preset's SGD momentum stays
         "optimizer.momentum is no argument of torch.optim.Adam (it takes lr, betas, "),
        (["+scheduler.milestones=[2]"], "scheduler.milestones is no argument of "
         "torch.optim.lr_scheduler.StepLR"),
    ],
)  # fmt: skip
def test_a_bad_value_is_refused_by_the_config_layer(overrides, message):
    with pytest.raises(OptionError) as err:
        validate_config(compose_config(["dataset=fake", *overrides]))
    assert str(err.value).startswith(message), str(err.value)


@pytest.mark.parametrize(
    "args, message",
    [
        (["+seed=3"], "+seed=3 adds seed, which the config has already (seed: 0): write seed=3"),
        (["-m", "+optimizer.lr=1e-3,1e-4"],
         "+optimizer.lr=1e-3,1e-4 adds optimizer.lr, which the config has already (optimizer.lr: "
         "0.0001): write optimizer.lr=1e-3,1e-4 to change it"),
        (["-m", "sweep=lr", "+hydra.sweeper.n_trial=2"],
         "unknown key hydra.sweeper.n_trial: did you mean hydra.sweeper.n_trials?"),
        (["-m", "+hydra.sweeper.n_trial=2"],  # Hydra's basic sweeper has no n_trials
         "unknown key hydra.sweeper.n_trial: the keys of hydra.sweeper are max_batch_size, params"),
        (["trainer.epochs=(1"], "cannot read the override 'trainer.epochs=(1' (extraneous input "
         "'(' ); write key=value and quote a value with spaces or special characters"),
    ],
)  # fmt: skip
def test_a_bad_command_line_is_refused_before_hydra(args, message):
    with pytest.raises(FdfaError) as err:
        preflight(args)
    assert str(err.value).startswith(message.replace("' )", "')")), str(err.value)


@pytest.mark.parametrize(
    "args", [["~seed", "+seed=3"], ["+trainer.max_steps=5"], ["-m", "+trainer.max_steps=5,6"]]
)
def test_adding_a_key_that_is_deleted_or_null_still_passes(args):
    preflight(args)  # as Hydra: + adds what the config lacks, or holds as null


def test_an_unquoted_path_with_a_space_is_one_line_and_creates_no_folder(tmp_path):
    with pytest.raises(FdfaError) as err:
        preflight([f"hydra.run.dir={tmp_path}/my", "runs/x", "trainer.epochs=1"])
    assert str(err.value) == (
        f"'runs/x' is not a key=value override: if it is the rest of hydra.run.dir={tmp_path}/my "
        f'(a value with a space), quote the whole argument: "hydra.run.dir={tmp_path}/my runs/x"'
    )
    assert list(tmp_path.iterdir()) == []  # no half of the path made on the way


# ---- refused when the data loads, before training ---------------------------------------


class LabelledBeyondItsClasses(PrototypeData):
    """A dataset whose training labels reach 7 while it declares 4 classes."""

    def __init__(self, **kwargs):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 1, 8, 8, generator=g)
        y = torch.arange(64) % 8
        TensorData.__init__(self, x, y, x[:16], y[:16] % 4, 4, batch_size=16, mean=0.0, std=1.0)


def test_labels_out_of_range_are_refused_when_the_data_loads():
    with pytest.raises(FdfaError) as err:
        LabelledBeyondItsClasses()
    assert str(err.value) == (
        "the training labels range over 0..7 but the dataset has 4 classes (0..3): fix the "
        "labels, or set the dataset's num_classes to cover them"
    )
    check_labels(torch.tensor([0, 3, 1]), 4, "test")  # in range: nothing said
    with pytest.raises(FdfaError, match=r"^the test labels range over -1\.\.1 but MNIST has 10"):
        check_labels(torch.tensor([-1, 1]), 10, "test", owner="MNIST", fix="delete them")


@pytest.mark.parametrize(
    "mean, std, message",
    [
        ([0.1, 0.2], 0.5,
         "dataset.mean has 2 values but the images have 1 channel: give one number; "
         "e.g. dataset.mean=0.5"),
        (0.5, [0.2, 0.2], "dataset.std has 2 values but the images have 1 channel"),
    ],
)  # fmt: skip
def test_a_mean_or_std_per_channel_must_match_the_channels(mean, std, message):
    with pytest.raises(OptionError) as err:
        PrototypeData(mean=mean, std=std)
    assert str(err.value) == message or str(err.value).startswith(message)
    PrototypeData(image_shape=(2, 4, 4), mean=[0.1, 0.2], std=[1.0, 2.0])  # one per channel
    with pytest.raises(OptionError, match="have 2 channels: give one number, or 2; e.g. "):
        PrototypeData(image_shape=(2, 4, 4), mean=[0.1, 0.2, 0.3])


# ---- a damaged checkpoint of the right format --------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("finished")
    short = synthetic_overrides("trainer.epochs=1", "trainer.max_steps=2", "~metrics")
    train(compose_config(short), run_dir)
    return run_dir


def written(run_dir) -> list[str]:
    """The files of a run dir, without the lock a refused run held there."""
    return sorted(p.name for p in run_dir.iterdir() if p.name != ".lock")


def damaged(ckpt: dict, change: str) -> dict:
    ckpt = dict(ckpt)
    if change == "no rng":
        del ckpt["rng"]
    elif change == "epoch x":
        ckpt["progress"] = {**ckpt["progress"], "epoch": "x"}
    elif change == "no progress.perm":
        ckpt["progress"] = {k: v for k, v in ckpt["progress"].items() if k != "perm"}
    elif change == "records a dict":
        ckpt["records"] = {}
    return ckpt


@pytest.mark.parametrize(
    "change, field",
    [
        ("no rng", "rng is missing"),
        ("epoch x", "progress.epoch is a str, not int"),
        ("no progress.perm", "progress.perm is missing"),
        ("records a dict", "records is a dict, not list"),
    ],
)
def test_a_checkpoint_with_a_missing_or_mistyped_field_is_refused_as_it_is(
    finished_run, tmp_path, change, field
):
    last = tmp_path / "last.ckpt"
    torch.save(damaged(torch.load(finished_run / "last.ckpt", weights_only=True), change), last)
    before = last.read_bytes()
    with pytest.raises(RunDirRefused) as err:
        train(compose_config(synthetic_overrides("trainer.epochs=2")), tmp_path)
    assert str(err.value) == (
        f"checkpoint {last} is damaged: its field {field}; resume from another checkpoint "
        "(trainer.resume=<path>), or start over here with trainer.resume=never"
    )
    assert written(tmp_path) == ["last.ckpt"]  # nothing else written
    assert last.read_bytes() == before


# ---- what the machine refuses: a path that may not change, memory ------------------------


def test_a_path_that_may_not_change_is_one_line_naming_it(tmp_path):
    kept = tmp_path / "events.out.tfevents.1"
    kept.write_text("")
    err = PermissionError(1, "Operation not permitted", str(kept))
    assert str(machine_refusal(err, "resume with: X")) == (
        f"cannot change {kept} (Operation not permitted): make it writable (chmod u+w, or "
        "chattr -i if immutable), then resume with: X"
    )
    temp = tmp_path / ".metrics.jsonl.abc.tmp"  # a file the write would have made
    try:
        raise RuntimeError("wrapped") from PermissionError(13, "Permission denied", str(temp))
    except RuntimeError as wrapped:
        line = str(machine_refusal(wrapped, "resume"))
    assert line.startswith(f"cannot write in {tmp_path} (Permission denied): make it writable")
    assert machine_refusal(FileNotFoundError(2, "No such file", str(temp)), "") is None
    assert machine_refusal(ValueError("a bug"), "") is None


def test_memory_that_cannot_be_allocated_is_one_line_naming_what_was_built():
    cpu = RuntimeError(
        "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
        "memory: you tried to allocate 256000000000000 bytes. Error code 12"
    )
    try:
        raise Exception("Error in call to target 'fdfa.models.FCNet':\nfull_key: model") from cpu
    except Exception as hydra_wrapped:
        line = str(machine_refusal(hydra_wrapped, "resume"))
    assert line == (
        "out of memory building model (256000.0 GB wanted): choose a smaller model (model.width, "
        "...) or dataset.batch_size, or free memory"
    )
    gpu = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0)")
    assert str(machine_refusal(gpu, "")).startswith("out of memory (20.00 GiB wanted): ")
    assert machine_refusal(FdfaError("out of memory: already one line"), "") is None


def test_an_unwritable_wandb_dir_is_one_warning_and_the_run_dir_holds_the_files(
    tmp_path, monkeypatch, caplog
):
    (tmp_path / "a_file").write_text("where the folder should be")
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)  # stops after the check
    with caplog.at_level("WARNING", logger="fdfa.loggers"):
        WandbLogger(out_dir=str(tmp_path / "run"), dir=str(tmp_path / "a_file" / "w"))
    warnings = [r.getMessage() for r in caplog.records if "not writable" in r.getMessage()]
    assert warnings == [
        f"W&B's folder {tmp_path / 'a_file' / 'w'} is not writable (Not a directory): its files "
        "go to the run dir instead; make it writable, or set logger.wandb.dir (or $WANDB_DIR) to "
        "one that is"
    ]


# ---- the line the user sees: one command each ---------------------------------------------

SMALL = [
    "dataset=fake", "dataset.image_shape=[1,8,8]", "dataset.num_classes=4",
    "dataset.train_size=128", "dataset.test_size=32", "dataset.val_size=0", "model.width=16",
    "trainer.epochs=1", "logger=none",
]  # fmt: skip


def one_error_line(res) -> str:
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, start",
    [
        (["scheduler.step_size=0"], "error: scheduler.step_size must be an integer >= 1"),
        (["~trainer.epochs"], "error: trainer.epochs is missing and a run needs it"),
        (["-m", "sweep=lr", "+hydra.sweeper.n_trial=2"],
         "error: unknown key hydra.sweeper.n_trial: did you mean hydra.sweeper.n_trials?"),
        (["dataset.std=0"], "error: dataset.std must be a finite number > 0"),
        (["dataset.mean=[0.1,0.2]"], "error: dataset.mean has 2 values but the images have 1"),
        (["model.width=1e12"], "error: model.width must be null or an integer >= 1"),
        (["model.width=1000000000000"], "error: out of memory building model ("),
        (["dataset.image_shape=[3,0,0]"], "error: dataset.image_shape must be three integers"),
        (["+seed=3"], "error: +seed=3 adds seed, which the config has already (seed: 0): "
         "write seed=3 to change it"),
        (["dataset._target_=tests.test_bad_inputs.LabelledBeyondItsClasses"],
         "error: the training labels range over 0..7 but the dataset has 4 classes"),
    ],
)  # fmt: skip
def test_cli_a_bad_value_is_one_error_line(tmp_path, args, start):
    dirs = ["hydra.sweep.dir=" if "-m" in args else "hydra.run.dir=", str(tmp_path / "run")]
    res = run_cli([*SMALL, *args, "".join(dirs)], cwd=tmp_path)
    assert one_error_line(res).startswith(start)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before any training


@pytest.mark.slow
def test_cli_an_unquoted_path_with_a_space_is_one_line_and_creates_nothing(tmp_path):
    res = run_cli([*SMALL, f"hydra.run.dir={tmp_path}/my", "runs/x"], cwd=tmp_path)
    assert one_error_line(res) == (
        f"error: 'runs/x' is not a key=value override: if it is the rest of hydra.run.dir="
        f'{tmp_path}/my (a value with a space), quote the whole argument: "hydra.run.dir='
        f'{tmp_path}/my runs/x"'
    )
    assert sorted(os.listdir(tmp_path)) == []


@pytest.mark.slow
def test_cli_a_damaged_checkpoint_is_one_line_and_the_run_dir_stays(finished_run, tmp_path):
    ckpt = torch.load(finished_run / "last.ckpt", weights_only=True)
    torch.save(damaged(ckpt, "no rng"), tmp_path / "last.ckpt")
    before = (tmp_path / "last.ckpt").read_bytes()
    res = run_cli([*SMALL, "trainer.epochs=2", f"hydra.run.dir={tmp_path}"], cwd=tmp_path)
    assert one_error_line(res) == (
        f"error: checkpoint {tmp_path / 'last.ckpt'} is damaged: its field rng is missing; "
        "resume from another checkpoint (trainer.resume=<path>), or start over here with "
        "trainer.resume=never"
    )
    assert (tmp_path / "last.ckpt").read_bytes() == before
    assert written(tmp_path) == ["last.ckpt", "run.log"]  # run.log: Hydra's, empty
    assert (tmp_path / "run.log").read_text() == ""


def chattr(flag: str, path) -> bool:
    return subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode == 0


@contextlib.contextmanager
def unfrozen_after(path):
    """Skip where ``chattr +i`` (immutable, refused even to root) is not allowed; ``path`` is
    made mutable again when the test ends, whatever froze it."""
    if not (chattr("+i", path) and chattr("-i", path)):
        pytest.skip("chattr +i is not allowed here")
    try:
        yield path
    finally:
        chattr("-i", path)


@pytest.mark.slow
def test_cli_an_undeletable_tensorboard_file_is_one_line_naming_it(tmp_path):
    old = tmp_path / "run" / "events.out.tfevents.1.old"
    old.parent.mkdir()
    old.write_text("")
    with unfrozen_after(old):
        chattr("+i", old)
        res = run_cli([*SMALL, "logger=tensorboard", f"hydra.run.dir={old.parent}"], cwd=tmp_path)
    line = one_error_line(res)
    assert line.startswith(f"error: cannot change {old} (Operation not permitted): make it")
    assert "then resume with: python " in line and f"hydra.run.dir={old.parent}" in line


@pytest.mark.slow
def test_cli_an_unwritable_wandb_dir_is_one_warning_in_the_log_and_files_in_the_run_dir(tmp_path):
    (tmp_path / "a_file").write_text("where the folder should be")
    run_dir = tmp_path / "run"
    res = run_cli(
        [*SMALL, "logger=wandb", f"logger.wandb.dir={tmp_path / 'a_file' / 'w'}",
         f"hydra.run.dir={run_dir}"], cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    log = (run_dir / "run.log").read_text()
    assert log.count(f"W&B's folder {tmp_path / 'a_file' / 'w'} is not writable") == 1
    assert list((run_dir / "wandb").glob("offline-run-*"))


class FreezeRunDir:
    """A logger that makes the run dir immutable at its first record (as a user's chattr +i
    mid-run): the end of the epoch then cannot write its checkpoint."""

    def __init__(self, out_dir, **_):
        self.out_dir = out_dir

    def log_metrics(self, metrics, step):
        chattr("+i", self.out_dir)

    def finish(self, summary):
        pass


@pytest.mark.slow
def test_cli_a_run_dir_made_immutable_mid_run_is_one_line_naming_it(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with unfrozen_after(run_dir):  # FreezeRunDir freezes it
        res = run_cli(
            [*SMALL, "+logger.freeze._target_=tests.test_bad_inputs.FreezeRunDir",
             f"hydra.run.dir={run_dir}"], cwd=tmp_path,
        )  # fmt: skip
    line = one_error_line(res)
    assert line.startswith(f"error: cannot write in {run_dir} (Operation not permitted): make it")
    assert line.endswith(f"then resume with: {resume_line(run_dir)}")


def resume_line(run_dir) -> str:
    return " ".join(
        ["python", str(REPO / "run.py"), *(shlex.quote(a) for a in SMALL)]
        + ["+logger.freeze._target_=tests.test_bad_inputs.FreezeRunDir", f"hydra.run.dir={run_dir}"]
    )


@pytest.mark.slow
def test_extracted_mnist_labels_out_of_range_are_refused_when_loading(tmp_path):
    src = mnist_raw()
    if not src.is_dir():
        pytest.skip(f"real MNIST not found at {src}")
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        with gzip.open(src / f"{name}.gz") as f:
            (raw / name).write_bytes(f.read())
    with gzip.open(src / "train-labels-idx1-ubyte.gz") as f:
        labels = bytearray(f.read())
    labels[8 + 5] = 200  # the 6th label, after the 8-byte header
    (raw / "train-labels-idx1-ubyte").write_bytes(bytes(labels))
    with pytest.raises(FdfaError) as err:
        TorchvisionData("mnist", str(tmp_path), download=False)
    assert str(err.value) == (
        f"the train labels range over 0..200 but MNIST has 10 classes (0..9): the label files in "
        f"{raw} are corrupt; delete the extracted files so torchvision extracts them again from "
        "the archives"
    )
