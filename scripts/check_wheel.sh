#!/usr/bin/env bash
# The installable package works outside the checkout: build fdfa's wheel, install it into a fresh
# venv, and from an empty directory run a short `fdfa` job and compose a shipped sweep.
#   bash scripts/check_wheel.sh            # CI (.ci/run); about 1 to 2 minutes
# The fresh venv sees the packages of the Python that runs this script (a venv of yours or a
# system Python; scripts/link_site_packages.py), so torch is not downloaded again
# (`venv --system-site-packages` would not do: started from a venv, it points at the venv's base
# Python, which may lack torch and Hydra). The wheel goes in with --no-deps and --ignore-installed
# (an editable fdfa of this Python is visible to pip, not to imports).
# FDFA_WHEEL_PIP_ARGS: extra `pip wheel` args (e.g. --no-build-isolation where no package index
# is reachable).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# shellcheck disable=SC2086  # the extra args are words
python -m pip wheel --quiet --no-deps ${FDFA_WHEEL_PIP_ARGS:-} -w "$work/dist" "$repo"
python -m venv "$work/venv"
python "$repo/scripts/link_site_packages.py" "$work/venv" --except "$repo"
"$work/venv/bin/python" -m pip install --quiet --no-deps --ignore-installed "$work"/dist/fdfa-*.whl

mkdir "$work/elsewhere"
cd "$work/elsewhere"
# The package and the sweeper come from the venv, not from a checkout.
"$work/venv/bin/python" - "$work/venv" <<'PY'
import sys
import fdfa, hydra_plugins.fdfa_optuna_sweeper as sweeper
for module in (fdfa, sweeper):
    assert module.__file__.startswith(sys.argv[1]), f"{module.__name__} from {module.__file__}"
PY
"$work/venv/bin/fdfa" dataset=fake dataset.train_size=256 dataset.test_size=64 \
    trainer.max_steps=2 logger=none
ls outputs/fdfa-fc-fake/*/summary.json  # written relative to the current directory
# conf/ and sweeps/ ship in the wheel: the sweep group composes (nothing runs with --cfg).
"$work/venv/bin/fdfa" sweep=lr --cfg hydra | grep -q "optimizer.lr: tag(log"
# so do the bases outside the groups: a preset on a preset on conf/_experiment.yaml, a dataset on
# conf/_torchvision.yaml
"$work/venv/bin/fdfa" experiment=mnist_fc1 --cfg job | grep -q "test_batch_size: 1000"
echo "wheel ok: $(basename "$work"/dist/fdfa-*.whl)"
