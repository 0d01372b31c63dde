import os
import shutil
import warnings

import pytest
import torch

from tests.helpers import mnist_raw

warnings.filterwarnings(
    "ignore", message=".*torch.jit.script.*is deprecated", category=FutureWarning
)


@pytest.fixture(autouse=True)
def _small_threads():
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory):
    """A writable dataset root whose MNIST/raw links to the read-only shared archives (the .gz
    files only: torchvision extracts beside them, and writing through a link to an extracted
    file would change the shared copy)."""
    src = mnist_raw()  # $FDFA_DATA_DIR/MNIST/raw, by default ../shared/data/MNIST/raw
    if not src.is_dir():
        pytest.skip(f"real MNIST not found at {src}")
    root = tmp_path_factory.mktemp("data")
    (root / "MNIST" / "raw").mkdir(parents=True)
    for f in src.glob("*.gz"):
        try:
            os.symlink(f, root / "MNIST" / "raw" / f.name)
        except OSError:
            shutil.copy(f, root / "MNIST" / "raw" / f.name)
    return root
