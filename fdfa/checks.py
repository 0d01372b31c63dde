"""Plain-Python checks of a constructor's arguments, declared beside its signature::

    @check_arguments(n_layers=integer(1, example=2), width=integer(1, example=800, null=True))
    def __init__(self, input_shape, num_classes, n_layers: int = 2, width: int | None = None):

A bad value raises, before the constructor's body runs, ``ArgumentError`` (a ValueError) or, for
a value of the wrong type, ``ArgumentTypeError`` (also a TypeError), with one line about the
argument: ``n_layers must be an integer >= 1, got 0``, as torch.optim does. Both are FdfaErrors
(a command prints them as ``error: ...``, exit 2).

The config layer (fdfa/validate.py) reads the same checks (``argument_checks``) to check a
composed config before anything is built, and names the config key in its message. This module
imports nothing but the standard library and fdfa.errors: the rules, models and data depend on
it, never on Hydra.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fdfa.errors import FdfaError


def python_text(value) -> str:
    """A value as Python code writes it (``None``, ``True``, ``'adam'``)."""
    return repr(value)


@dataclass(frozen=True)
class Check:
    """What one argument accepts: ``of_type`` (else a TypeError), then ``in_range`` (else a
    ValueError); ``describe(spell)`` says what the value must be, with each literal value
    written by ``spell`` (Python's ``None`` here, the config's ``null`` there); ``example`` is a
    valid value, for the fix a message proposes."""

    of_type: Callable[[Any], bool]
    in_range: Callable[[Any], bool]
    describe: Callable[[Callable[[Any], str]], str]
    example: Any

    def __call__(self, name: str, value) -> None:
        """Raise ArgumentTypeError / ArgumentError naming ``name`` if ``value`` fails."""
        if not self.of_type(value):
            raise ArgumentTypeError(name, value, self)
        if not self.in_range(value):
            raise ArgumentError(name, value, self)


class ArgumentError(FdfaError, ValueError):
    """A constructor argument out of its range: ``<name> must be <what>, got <value>``.
    ``argument``, ``value`` and ``check`` let the config layer name its own key instead."""

    def __init__(self, argument: str, value, check: Check):
        super().__init__(f"{argument} must be {check.describe(python_text)}, got {value!r}")
        self.argument, self.value, self.check = argument, value, check


class ArgumentTypeError(ArgumentError, TypeError):
    """A constructor argument of the wrong type (also a TypeError, as Python's own)."""


def _is_integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def integer(
    low: int | None = None,
    high: int | None = None,
    *,
    example: int = 1,
    null: bool = False,
    note: str = "",
) -> Check:
    """An integer >= ``low`` (any integer when None), <= ``high`` where given; also None with
    ``null``. ``note`` ends the requirement; ``{null}`` in it is the reader's word for None."""
    what = "an integer" if low is None else f"an integer >= {low}"
    what = what if high is None else f"an integer in [{low}, {high}]"
    return Check(
        lambda v: (null and v is None) or _is_integer(v),
        lambda v: v is None or ((low is None or v >= low) and (high is None or v <= high)),
        lambda spell: (f"{spell(None)} or " if null else "") + what + note.format(null=spell(None)),
        example,
    )


def number(example: float, low: float = 0, strict: bool = True) -> Check:
    """A finite number > ``low`` (>= with ``strict=False``); inf and nan are never a setting."""
    return Check(
        _is_number,
        lambda v: math.isfinite(v) and (v > low if strict else v >= low),
        lambda spell: f"a finite number {'>' if strict else '>='} {low:g}",
        example,
    )


def fraction(example: float) -> Check:
    """A number in [0, 1)."""
    return Check(_is_number, lambda v: 0 <= v < 1, lambda spell: "a number in [0, 1)", example)


def one_of(*values) -> Check:
    """One of ``values`` (the first is the example)."""
    return Check(
        lambda v: True,
        lambda v: v in values,
        lambda spell: " or ".join(spell(v) for v in values),
        values[0],
    )


def per_channel(example: float, positive: bool = False) -> Check:
    """A finite number (> 0 with ``positive``), or a non-empty list of them (one per channel)."""

    def numbers(v) -> list:
        return list(v) if isinstance(v, Sequence) and not isinstance(v, str) else [v]

    what = "a finite number > 0" if positive else "a finite number"
    return Check(
        lambda v: bool(numbers(v)) and all(_is_number(x) for x in numbers(v)),
        lambda v: all(math.isfinite(x) and (x > 0 or not positive) for x in numbers(v)),
        lambda spell: f"{what} or a list of them, one a channel",
        example,
    )


def image_shape(example=(1, 28, 28)) -> Check:
    """Channels, height and width: three integers >= 1."""
    return Check(
        lambda v: isinstance(v, Sequence) and len(v) == 3 and all(_is_integer(x) for x in v),
        lambda v: min(v) >= 1,
        lambda spell: "three integers >= 1 (channels, height, width)",
        "[" + ",".join(map(str, example)) + "]",
    )


def boolean(example: bool = True) -> Check:
    return Check(
        lambda v: isinstance(v, bool),
        lambda v: True,
        lambda spell: f"{spell(True)} or {spell(False)}",
        example,
    )


def check_arguments(_shown_prefix: str = "", /, **checks: Check):
    """Decorate ``__init__`` (or any function) so that each named argument a call passes is
    checked first (defaults are not: they are valid). ``_shown_prefix`` goes before the argument
    name in messages, for a class built from one config section alone (``"metrics."``). The
    checks stay readable as the function's ``argument_checks``."""

    def decorate(function):
        signature = inspect.signature(function)
        unknown = sorted(set(checks) - set(signature.parameters))
        if unknown:
            raise TypeError(f"{function.__qualname__} has no argument {', '.join(unknown)}")

        @functools.wraps(function)
        def checked(*args, **kwargs):
            given = signature.bind(*args, **kwargs).arguments
            for name, check in checks.items():
                if name in given:
                    check(_shown_prefix + name, given[name])
            return function(*args, **kwargs)

        checked.argument_checks = dict(checks)
        return checked

    return decorate


def argument_checks(target) -> dict[str, Check]:
    """Every check ``target`` (a class or a function) applies to its arguments: for a class,
    those of each ``__init__`` along its MRO (a subclass passes ``**kwargs`` on to its base's),
    the subclass's first."""
    if not inspect.isclass(target):
        return dict(getattr(target, "argument_checks", {}))
    found: dict[str, Check] = {}
    for klass in reversed(target.__mro__):
        found.update(getattr(vars(klass).get("__init__"), "argument_checks", {}))
    return found
