"""The config layer's checks of a command line and a composed config, before any work.

- ``preflight(argv)``: before Hydra composes the config (unknown group options, unknown keys with
  the closest valid one, an unwritable run dir): Hydra's own messages for these are long, come
  with a traceback, or (``+trainer.epoch=1``) do not come at all.
- ``validate_config(cfg)``: types and ranges of the composed config's values, before anything is
  built: each node's class checks its own arguments (declared on its constructor, fdfa/checks.py),
  RUN_CHECKS the keys of no fdfa class; a failure names the config key.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import inspect
import io
import os
import re
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra._internal.utils import get_args_parser
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from fdfa.checks import ArgumentError, Check, argument_checks, boolean, integer, number
from fdfa.errors import FdfaError, OptionError, one_line

_HERE = Path(__file__).resolve().parent
# conf/ shipped inside the package (a wheel), else the checkout's conf/ beside fdfa/
CONF_DIR = _HERE / "conf" if (_HERE / "conf").is_dir() else _HERE.parent / "conf"


SEED_MAX = 2**32 - 1  # numpy's seeds are 32-bit
DEVICE = Check(
    lambda v: isinstance(v, str),
    lambda v: re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None,
    lambda spell: "auto, cpu or cuda",
    "cpu",
)

# The keys no fdfa constructor takes, with their checks: the run's own (seed and trainer.*, read
# by fdfa/train.py's Run) and those of torch's optimizer and scheduler (torch checks them only
# when they are built, after the data loaded, in messages that name no key). Every other value
# is checked by the class its config node names (``_target_``), with the checks declared on its
# constructor (fdfa/checks.py): a new option of a rule, model or dataset needs no line here.
RUN_CHECKS = {
    "seed": integer(0, high=SEED_MAX, example=0),
    "optimizer.lr": number(1e-3),
    "optimizer.weight_decay": number(0.0, strict=False),
    "scheduler.gamma": number(0.99),
    "scheduler.step_size": integer(1, example=1),  # StepLR: 0 divides by zero after epoch 1
    "trainer.epochs": integer(1, example=10),
    "trainer.max_steps": integer(1, example=1000, null=True),
    "trainer.ckpt_every_n_steps": integer(1, example=500, null=True),
    "trainer.device": DEVICE,
    "trainer.cuda_graph": boolean(),
    "trainer.dist_timeout_s": number(600.0),  # under torchrun (fdfa/distributed.py)
    "trainer.sync_batchnorm": boolean(),
}
# The keys a run reads without a default: deleting one (~trainer.epochs) is refused at once.
REQUIRED = ("seed", "trainer.epochs", "trainer.max_steps", "trainer.device")


def config_text(value) -> str:
    """A value as a config (and the command line) writes it: ``null``, ``true``, ``adam``."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return str(value)


_ABSENT = object()


def check_key(key: str, check: Check, cfg: DictConfig) -> None:
    """Apply ``check`` to the value of ``key`` in ``cfg`` (if ``cfg`` has the key); a failure
    raises OptionError (an FdfaError and a ValueError): one line naming the key, what it must be,
    and an example."""
    value = OmegaConf.select(cfg, key, default=_ABSENT)
    if value is _ABSENT:
        return
    try:
        check(key, value)
    except ArgumentError as err:
        raise OptionError(
            f"{key} must be {check.describe(config_text)}, got {value!r}; "
            f"e.g. {key}={config_text(check.example)}"
        ) from err


def validate_config(cfg: DictConfig) -> None:
    """Raise OptionError naming the first value of the wrong type or out of range: the keys of
    RUN_CHECKS, then each argument of each config node's class (``_target_``) that the class
    checks (fdfa.checks.argument_checks), before any of them is built."""
    for key in OmegaConf.missing_keys(cfg):  # ??? in a config: model=custom's _target_
        raise OptionError(f"{key} must be set (e.g. {key}=mynet.MyNet for model=custom)")
    for key in REQUIRED:
        if OmegaConf.select(cfg, key, default=_ABSENT) is _ABSENT:
            example = f"{key}={config_text(RUN_CHECKS[key].example)}"
            raise OptionError(
                f"{key} is missing and a run needs it: remove ~{key} from the command (or give "
                f"it a value, e.g. +{example})"
            )
    for key, check in RUN_CHECKS.items():
        check_key(key, check, cfg)
    for node, target in _flat_keys(cfg)[1].items():
        found = target_class(node, target)
        if node in TORCH_NODES:
            check_arguments_taken(node, target, found, cfg)
        for name, check in argument_checks(found).items():
            check_key(f"{node}.{name}", check, cfg)


# Nodes built from every key they hold by torch's own classes: a key the class does not take
# (optimizer=adam on a preset that sets optimizer.momentum for SGD) fails there, in a traceback.
TORCH_NODES = ("optimizer", "scheduler")


def check_arguments_taken(node: str, target: str, found, cfg: DictConfig) -> None:
    """One line naming a key of ``node`` that its class ``found`` (named ``target``) takes no
    argument for."""
    try:
        params = inspect.signature(found).parameters
    except (TypeError, ValueError):  # a builtin without a signature: torch checks it itself
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    keys = [k for k in OmegaConf.select(cfg, node) if not str(k).startswith("_")]
    for key in keys:
        if key not in params:
            taken = ", ".join(p for p in params if p not in ("self", "params", "optimizer"))
            raise OptionError(
                f"{node}.{key} is no argument of {target} (it takes {taken}): remove it with "
                f"~{node}.{key}"
            )


def target_class(node: str, target: str):
    """The class (or function) a config node's ``_target_`` names, or one line saying why not
    (a user's own module is found in the current directory or on PYTHONPATH)."""
    module, _, name = target.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name, None) if module else None
    except ImportError as err:
        raise FdfaError(
            f"{node}._target_={target}: cannot import {module} ({one_line(err)}); put "
            f"{module.split('.')[0]}.py in the current directory or on PYTHONPATH"
        ) from None
    if found is None:
        raise FdfaError(f"{node}._target_={target}: {module or target} has no {name!r}")
    return found


GROUP_OVERRIDE = re.compile(r"^(\w+)=(.*)$")


def preflight(argv: list[str], conf_dir: Path = CONF_DIR) -> None:
    """Command-line checks before Hydra runs: group options exist, the run dir is writable."""
    if any(
        a.startswith(("hydra.searchpath", "--config-dir", "-cd", "--info", "--help", "-h"))
        or a in ("--version", "--hydra-help")
        for a in argv
    ):
        return  # the user brings their own configs or asks Hydra for help
    check_grammar(command_overrides(argv))  # before anything below creates a folder
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


def command_overrides(argv: list[str]) -> list[str]:
    """The overrides among ``argv`` as Hydra's own argument parser finds them (no flags, no flag
    values); none where it refuses ``argv`` (Hydra then says why)."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return list(get_args_parser().parse_args(argv).overrides)
    except SystemExit:
        return []


def check_grammar(overrides: list[str]) -> None:
    """One line for an override Hydra's grammar refuses: Hydra's own message takes three lines
    and comes after the run dir was created. An argument without ``=`` right after a
    ``key=value`` is most often the rest of a value that has a space (an unquoted path)."""
    parser = OverridesParser.create()
    for i, arg in enumerate(overrides):
        try:
            parser.parse_overrides([arg])
        except HydraException as err:
            before = overrides[i - 1] if i else ""
            if "=" not in arg and not arg.startswith("~") and "=" in before:
                raise FdfaError(
                    f"{arg!r} is not a key=value override: if it is the rest of {before} (a value "
                    f'with a space), quote the whole argument: "{before} {arg}"'
                ) from None
            reason = (str(err).splitlines()[1:] or [""])[0].split(" expecting ")[0].strip()
            raise FdfaError(
                f"cannot read the override {arg!r} ({reason}); write key=value and quote a value "
                "with spaces or special characters (https://hydra.cc/docs/advanced/"
                "override_grammar/basic)"
            ) from None


# Classes of these packages are fdfa's own configs (conf/); a node with any other _target_ is the
# user's and takes any key.
OWN_PACKAGES = ("fdfa", "torch")


def check_keys(argv: list[str], conf_dir: Path = CONF_DIR) -> None:
    """Refuse a key the composed config does not have, with or without ``+``/``++``, naming the
    closest valid key: Hydra refuses ``trainer.epoch=1`` with a hint to add ``+``, and then
    accepts it and trains the default epochs. A config node whose class is the user's (its
    ``_target_`` set on the command line, or one not in conf/) takes any key. Hydra's own keys
    (``hydra.sweeper.n_trials``) are checked against Hydra's structured configs, whose free
    dicts (``hydra.sweeper.params``, ``hydra.job.env_set``) take any key."""
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
    ]
    if not keys:
        return
    try:
        composed = list(_compositions(groups, conf_dir))
    except HydraException:
        return  # a bad combination of options: Hydra says which when it composes
    deleted = {o.key_or_group for o in overrides if o.is_delete()}  # ~seed +seed=3: fine
    _check_additions(
        [o for o in overrides if o.type == OverrideType.ADD and o.key_or_group not in deleted],
        composed,
    )
    configs = [_flat_keys(cfg) for cfg in composed]
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
        if any(".".join(parts[:i]) in free for i in range(1, len(parts))):
            continue
        if parts[0] == "hydra":
            _check_hydra_key(key, [cfg.hydra for cfg in composed])
        elif key not in known:
            raise FdfaError(_unknown_key_message(key, known))


def _check_additions(additions: list[Override], composed: list[DictConfig]) -> None:
    """Refuse ``+key=value`` where the config has ``key`` already (with a value, and ``value``
    not a dict or list to merge into it), as Hydra would, in one line that says to drop the +."""
    for o in additions:
        value = None if o.is_sweep_override() else o.value()
        for cfg in composed:
            current = _child_at(cfg, o.key_or_group)
            if current is not None and not isinstance(value, (dict, list)):
                key, given = o.key_or_group, o.input_line.split("=", 1)[1]
                raise FdfaError(
                    f"{o.input_line} adds {key}, which the config has already ({key}: "
                    f"{config_text(current)}): write {key}={given} to change it"
                )


def _child_at(cfg: DictConfig, key: str):
    """The value at dotted ``key``, or None where it is absent or cannot be read yet."""
    try:
        return OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
    except Exception:  # noqa: BLE001 (an interpolation of Hydra's runtime)
        return None


def _check_hydra_key(key: str, hydra_configs: list[DictConfig]) -> None:
    """Refuse ``key`` (``hydra.<...>``) where one of its parents is one of Hydra's structured
    configs (a dataclass: the sweeper's, the launcher's, hydra.run) that lacks the next part; a
    free dict, or a parent with no node to look into, takes it (Hydra decides)."""
    for hydra_cfg in hydra_configs:
        node, parts = hydra_cfg, key.split(".")[1:]
        for part in parts:
            if not isinstance(node, DictConfig) or OmegaConf.get_type(node) in (dict, None):
                return
            if part not in node.keys():
                break
            node = _child(node, part)
        else:
            return
    known = {f"hydra.{k}" for cfg in hydra_configs for k in _structured_keys(cfg)}
    raise FdfaError(_unknown_key_message(key, known, lists_all="python run.py --cfg hydra"))


def _child(node: DictConfig, key):
    """``node[key]``, or None where it cannot be read yet (a missing value, an interpolation of
    Hydra's runtime)."""
    try:
        return node[key]
    except Exception:  # noqa: BLE001 (OmegaConf raises several kinds)
        return None


def _structured_keys(node: DictConfig, prefix: str = "") -> set[str]:
    """The dotted keys of a structured config's nodes, down to its free dicts."""
    keys = set()
    for k in node.keys():
        keys.add(prefix + str(k))
        child = _child(node, k)
        if isinstance(child, DictConfig) and OmegaConf.get_type(child) not in (dict, None):
            keys |= _structured_keys(child, f"{prefix}{k}.")
    return keys


def _is_group(override: Override, conf_dir: Path) -> bool:
    """A choice of a group (algorithm=bp, ~model, experiment=..., sweep=..., Hydra's
    hydra/launcher=joblib), not a key."""
    group = override.key_or_group
    return group.startswith("hydra/") or group_dir(group, conf_dir) is not None


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
            overrides = fixed + [f"{g}={v}" for g, v in chosen.items()]
            yield compose("config", overrides, return_hydra_config=True)


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


def _unknown_key_message(
    key: str, known: set[str], lists_all: str = "python run.py --cfg job"
) -> str:
    """The closest key of the same section (hydra.sweeper.n_trial: n_trials, not params), else
    of the whole config when the section has no keys (trainr.epochs: trainer.epochs), else the
    section's keys."""
    public = sorted(k for k in known if not k.rpartition(".")[2].startswith("_"))  # no _target_
    section, _, leaf = key.rpartition(".")
    siblings = [k.removeprefix(section + ".") for k in public if k.rpartition(".")[0] == section]
    if siblings:
        close = [
            f"{section}.{k}" if section else k
            for k in difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.6)
        ]
    else:
        candidates = [k for k in public if not key.startswith(k + ".")]  # not its own parents
        close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if close:
        return f"unknown key {key}: did you mean {close[0]}? ({lists_all} lists all)"
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
    reason = unwritable_reason(path)
    if reason:
        raise FdfaError(
            f"{key} {path} is not a writable folder ({reason}); choose another with {key}=..."
        )


def unwritable_reason(path: Path) -> str | None:
    """Why files cannot be written in the folder ``path`` (created if absent), else None."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        return err.strerror or str(err)
    return None if os.access(path, os.W_OK) else "not writable"
