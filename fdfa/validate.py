"""Every check of user input that can run before any work, in one place.

- ``preflight(argv)``: before Hydra composes the config (unknown group options, unknown keys with
  the closest valid one, an unwritable run dir): Hydra's own messages for these are long, come
  with a traceback, or (``+trainer.epoch=1``) do not come at all.
- ``validate_config(cfg)``: types and ranges of the composed config's values (CHECKS), also
  applied by each component's constructor to its own arguments (``check_options``).
"""

from __future__ import annotations

import difflib
import math
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from fdfa.errors import FdfaError, OptionError

_HERE = Path(__file__).resolve().parent
# conf/ shipped inside the package (a wheel), else the checkout's conf/ beside fdfa/
CONF_DIR = _HERE / "conf" if (_HERE / "conf").is_dir() else _HERE.parent / "conf"


def _number(v):
    """A finite int or float (inf and nan are never a valid setting)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _integer(v):
    return isinstance(v, int) and not isinstance(v, bool)


class Check(NamedTuple):
    ok: Callable[[Any], bool]  # accepts the value
    requirement: str  # what the value must be, for the message
    example: Any  # a valid value, for the fix the message proposes


def integer(low: int | None = None, example: int = 1, null: bool = False, note: str = "") -> Check:
    """An integer >= ``low`` (any integer when None); also null (None) with ``null``."""
    what = "an integer" if low is None else f"an integer >= {low}"
    return Check(
        lambda v: (null and v is None) or (_integer(v) and (low is None or v >= low)),
        ("null or " if null else "") + what + note,
        example,
    )


def number(example: float, low: float = 0, strict: bool = True) -> Check:
    """A finite number > ``low`` (>= with ``strict=False``)."""
    sign = ">" if strict else ">="
    return Check(
        lambda v: _number(v) and (v > low if strict else v >= low),
        f"a finite number {sign} {low:g}",
        example,
    )


def fraction(example: float) -> Check:
    return Check(lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)", example)


def one_of(*values) -> Check:
    """One of ``values`` (the first is the example)."""
    return Check(lambda v: v in values, " or ".join(map(str, values)), values[0])


BOOLEAN = Check(lambda v: isinstance(v, bool), "true or false", "true")
SEED_MAX = 2**32 - 1  # numpy's seeds are 32-bit

# Every check of a single value, written once: config key -> Check. validate_config applies them
# all before anything is built; a component's constructor applies those of its own arguments
# (check_options), so Python code gets the same one-line message. A key absent from a config is
# not checked. A new option: its YAML line, its constructor argument and its row here.
CHECKS = {
    "seed": Check(
        lambda v: _integer(v) and 0 <= v <= SEED_MAX, f"an integer in [0, {SEED_MAX}]", 0
    ),
    "optimizer.lr": number(1e-3),
    "optimizer.weight_decay": number(0.0, strict=False),
    "algorithm.feedback_lr": number(1e-4),
    "algorithm.feedback_decay": fraction(0.0),
    "algorithm.momentum": fraction(0.99),
    "algorithm.n_directions": integer(1, example=4),
    "algorithm.feedback_update": one_of("adam", "ema"),
    "algorithm.feedback_init": one_of("zeros", "kaiming"),
    "algorithm.per_sample": BOOLEAN,
    "algorithm.perturbation": one_of("gaussian", "rademacher"),
    "model.n_layers": integer(1, example=2),
    "model.width": integer(1, example=800, null=True),
    "model.input_size": integer(1, example=224, null=True),
    "dataset.batch_size": integer(2, example=64, note=" (BatchNorm needs 2 samples per batch)"),
    "dataset.test_batch_size": integer(1, example=1000),
    "dataset.val_size": integer(0, example=0),
    "dataset.split_seed": integer(example=0),
    "dataset.subset": integer(2, example=1000, null=True),
    "dataset.augment": one_of("none", "flip_crop"),
    "scheduler.gamma": number(0.99),
    "trainer.epochs": integer(1, example=10),
    "trainer.max_steps": integer(1, example=1000, null=True),
    "trainer.ckpt_every_n_steps": integer(1, example=500, null=True),
    "trainer.device": Check(
        lambda v: isinstance(v, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None,
        "auto, cpu or cuda",
        "cpu",
    ),
    "trainer.cuda_graph": BOOLEAN,
    "metrics.every_n_steps": integer(1, 1000, null=True, note=" (null turns the metrics off)"),
    "metrics.jacobian_metrics": BOOLEAN,
    "metrics.jacobian_chunk_mb": number(32),
    "logger.wandb.init_timeout": number(30),
}


def check_value(key: str, value) -> None:
    """Raise OptionError (an FdfaError and a ValueError) if ``value`` fails the check of
    ``key``: one line naming the key, what it must be, and an example."""
    check = CHECKS[key]
    if not check.ok(value):
        raise OptionError(
            f"{key} must be {check.requirement}, got {value!r}; e.g. {key}={check.example}"
        )


def check_options(section: str, args: dict) -> None:
    """A constructor's check of its arguments, its first line: ``check_options("algorithm",
    locals())`` checks each argument that has a row ``algorithm.<name>`` in CHECKS."""
    for name, value in args.items():
        if f"{section}.{name}" in CHECKS:
            check_value(f"{section}.{name}", value)


def validate_config(cfg: DictConfig) -> None:
    """Raise OptionError naming the first value of the wrong type or out of range."""
    for key in CHECKS:
        value = OmegaConf.select(cfg, key, default="<absent>")
        if value != "<absent>":
            check_value(key, value)


GROUP_OVERRIDE = re.compile(r"^(\w+)=(.*)$")


def preflight(argv: list[str], conf_dir: Path = CONF_DIR) -> None:
    """Command-line checks before Hydra runs: group options exist, the run dir is writable."""
    if any(
        a.startswith(("hydra.searchpath", "--config-dir", "-cd", "--info", "--help", "-h"))
        for a in argv
    ):
        return  # the user brings their own configs or asks Hydra for help
    for arg in argv:
        m = GROUP_OVERRIDE.match(arg)
        if not m or group_dir(m.group(1), conf_dir) is None:
            continue
        group, value = m.groups()
        options = sorted(p.stem for p in group_dir(group, conf_dir).glob("*.yaml"))
        for option in _sweep_values(value):
            if option not in options and option != "null":
                raise FdfaError(f"unknown {group} {option!r}: choose one of {', '.join(options)}")
    if not any(a.startswith(("--config-name", "-cn", "--config-path", "-cp")) for a in argv):
        check_keys(argv, conf_dir)
    for arg in argv:
        for key in ("hydra.run.dir=", "hydra.sweep.dir="):
            if arg.startswith(key):
                _check_writable(Path(arg[len(key) :].strip("'\"")), key[:-1])


# Classes of these packages are fdfa's own configs (conf/); a node with any other _target_ is the
# user's and takes any key.
OWN_PACKAGES = ("fdfa", "torch")


def check_keys(argv: list[str], conf_dir: Path = CONF_DIR) -> None:
    """Refuse a key the composed config does not have, with or without ``+``/``++``, naming the
    closest valid key: Hydra refuses ``trainer.epoch=1`` with a hint to add ``+``, and then
    accepts it and trains the default epochs. A config node whose class is the user's (its
    ``_target_`` set on the command line, or one not in conf/) takes any key."""
    try:
        overrides = OverridesParser.create().parse_overrides(
            [a for a in argv if ("=" in a or a.startswith("~")) and not a.startswith("-")]
        )
    except HydraException:
        return  # Hydra's own grammar error comes later, with its message
    groups = [o for o in overrides if _is_group(o, conf_dir)]
    keys = [
        o.key_or_group
        for o in overrides
        if not _is_group(o, conf_dir)
        and o.type in (OverrideType.CHANGE, OverrideType.ADD, OverrideType.FORCE_ADD)
        and o.key_or_group.split("/")[0].split(".")[0] != "hydra"  # Hydra's own
    ]
    if not keys:
        return
    try:
        configs = [_flat_keys(cfg) for cfg in _compositions(groups, conf_dir)]
    except HydraException:
        return  # a bad combination of options: Hydra says which when it composes
    known = set().union(*(c for c, _ in configs))
    free = {k.removesuffix("._target_") for k in keys if k.endswith("._target_")}
    free |= {
        node
        for _, targets in configs
        for node, target in targets.items()
        if target.split(".")[0] not in OWN_PACKAGES
    }
    for key in keys:
        parts = key.split(".")
        if key in known or any(".".join(parts[:i]) in free for i in range(1, len(parts))):
            continue
        raise FdfaError(_unknown_key_message(key, known))


def _is_group(override: Override, conf_dir: Path) -> bool:
    """A choice of fdfa's groups (algorithm=bp, ~model, experiment=..., sweep=...), not a key."""
    return group_dir(override.key_or_group, conf_dir) is not None


def group_dir(group: str, conf_dir: Path = CONF_DIR) -> Path | None:
    """The folder of a config group's options: conf/<group>, or sweeps/ for ``sweep`` (registered
    by the sweeper plugin, hydra_plugins/fdfa_optuna_sweeper/sweep_group.py); None if not a
    group."""
    if (conf_dir / group).is_dir():
        return conf_dir / group
    if group == "sweep":
        from hydra_plugins.fdfa_optuna_sweeper.sweep_group import sweeps_dir

        return sweeps_dir()
    return None


def _compositions(groups: list[Override], conf_dir: Path):
    """The configs of the chosen group options: the first value of each swept group, then each
    other value of a swept group with the others at their first (not the whole product)."""
    fixed = [o.input_line for o in groups if not o.is_sweep_override()]
    swept = {
        o.input_line.split("=", 1)[0]: list(o.sweep_string_iterator())
        for o in groups
        if o.is_sweep_override()
    }
    first = {g: values[0] for g, values in swept.items()}
    variants = [first] + [{**first, g: v} for g, values in swept.items() for v in values[1:]]
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        for chosen in variants:
            yield compose("config", fixed + [f"{g}={v}" for g, v in chosen.items()])


def _flat_keys(cfg: DictConfig) -> tuple[set[str], dict[str, str]]:
    """Every dotted key of a config (inner nodes too, hydra's left out), and each node's
    ``_target_`` by the node's key."""
    keys, targets = set(), {}

    def walk(node, prefix):
        for k, v in node.items():
            key = f"{prefix}{k}"
            keys.add(key)
            if isinstance(v, dict):
                walk(v, key + ".")
                if isinstance(v.get("_target_"), str):
                    targets[key] = v["_target_"]

    container = OmegaConf.to_container(cfg, resolve=False)
    container.pop("hydra", None)
    walk(container, "")
    return keys, targets


def _unknown_key_message(key: str, known: set[str]) -> str:
    public = sorted(k for k in known if not k.rpartition(".")[2].startswith("_"))  # no _target_
    candidates = [k for k in public if not key.startswith(k + ".")]  # not its own parents
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if close:
        return f"unknown key {key}: did you mean {close[0]}? (python run.py --cfg job lists all)"
    section, _, _ = key.rpartition(".")
    siblings = [k.removeprefix(section + ".") for k in public if k.rpartition(".")[0] == section]
    if not siblings:
        return f"unknown key {key}: {section or 'the config'} has no keys to set"
    where = f"the keys of {section} are" if section else "the top-level keys are"
    return f"unknown key {key}: {where} {', '.join(siblings)}"


def _sweep_values(value: str) -> list[str]:
    """'a,b' and 'choice(a,b)' and '[a,b]' (a list of options) -> [a, b]; else [value]."""
    inner = re.fullmatch(r"(?:choice\((.*)\)|\[(.*)\])", value)
    value = next((g for g in inner.groups() if g is not None), value) if inner else value
    return [v.strip() for v in value.split(",") if v.strip()]


def _check_writable(path: Path, key: str) -> None:
    if "${" in str(path):
        return  # interpolated: Hydra resolves it later
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise FdfaError(
            f"{key} {path} is not a writable folder ({err.strerror or err}); "
            f"choose another with {key}=..."
        ) from None
    if not os.access(path, os.W_OK):
        raise FdfaError(f"{key} {path} is not writable; choose another with {key}=...")
