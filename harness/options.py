"""Option values checked against the config dataclasses that declare them (torch-free).

A config field's type hint gives its type; :func:`option` adds its range or
choices. :func:`check_config` checks every field of a config before any work
starts and returns a copy with values normalised (a JSON list becomes a
tuple, an int a float where a float is declared). A value that cannot work
is a :class:`~harness.errors.ConfigError` naming the option, the value and
what it may be, so the CLI prints one line instead of a traceback after
minutes of fitting.

Example:
    >>> @dataclasses.dataclass
    ... class PabeeConfig:
    ...     patience: int = option(3, min=1, max=BLOCKS)  # consecutive agreeing layers
    >>> check_config(PabeeConfig(patience=2.5))
    Traceback (most recent call last):
    harness.errors.ConfigError: patience=2.5: expected an integer
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Union

from harness.errors import ConfigError

# Bounds that stand for the backbone's block count, and the block before the last
# (known once the backbone is built).
BLOCKS = "blocks"
BLOCKS_BUT_LAST = "blocks-1"


def option(default: Any, *, min: float | str | None = None, max: float | str | None = None,
           above: float | None = None, choices: tuple[str, ...] | None = None, blocks: bool = False,
           help: str = "") -> Any:
    """A dataclass field with what its values may be.

    Args:
        min, max: inclusive bounds of a number (``BLOCKS``: the block count,
            ``BLOCKS_BUT_LAST``: one less).
        above: exclusive lower bound of a number.
        choices: the allowed strings.
        blocks: an int or tuple of ints naming blocks, each in 1..``max`` (default: the
            block count), no repeats.
        help: one line for ``--help``.
    """
    limits = {"min": min, "max": max, "above": above, "choices": choices, "blocks": blocks, "help": help}
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults are not allowed; use a tuple")
    return dataclasses.field(default=default, metadata=limits)


def check_config(config: Any, num_blocks: int | None = None, as_flags: bool = False) -> Any:
    """``config`` with every field checked and normalised (see the module docstring).

    Args:
        num_blocks: the backbone's block count; ``None`` leaves block bounds unchecked.
        as_flags: name options as command-line flags (``--batch-size 0``), not ``batch_size=0``.

    Raises:
        ConfigError: the first field whose value cannot work.
    """
    hints = typing.get_type_hints(type(config))
    values = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        try:
            value = _typed(value, hints[field.name])
            _check_limits(value, field.metadata, num_blocks)
        except ValueError as exc:
            shown = f"--{field.name.replace('_', '-')} {value}" if as_flags else f"{field.name}={_show(value)}"
            raise ConfigError(f"{shown}: {exc}") from None
        values[field.name] = value
    return dataclasses.replace(config, **values)


def _show(value: Any) -> str:
    return f"{value!r}" if isinstance(value, str) else str(list(value) if isinstance(value, tuple) else value)


def _typed(value: Any, hint: Any) -> Any:
    """``value`` as the type ``hint`` declares, or ValueError saying what was expected."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        for arm in sorted(args, key=lambda a: a is str):  # a string arm last: "3" is not the int 3
            try:
                return _typed(value, arm)
            except ValueError:
                pass
        raise ValueError(f"expected {' or '.join(_name(a) for a in args)}")
    if hint is type(None):
        if value is not None:
            raise ValueError("expected null")
        return None
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError("expected true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("expected an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError("expected a number")
        if not math.isfinite(value):
            raise ValueError("expected a finite number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError("expected a string")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"expected a list ({_name(hint)})")
        arms = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(arms) != len(value):
            raise ValueError(f"expected {len(arms)} items")
        return tuple(_typed(item, arm) for item, arm in zip(value, arms))
    return value  # a type this checker does not know: the method checks it itself


def _name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) is tuple:
        return "a list of " + _name(typing.get_args(hint)[0]) + "s"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(hint, str(hint))


def _check_limits(value: Any, limits: typing.Mapping[str, Any], num_blocks: int | None) -> None:
    def bound(b: float | str | None) -> float | None:
        if isinstance(b, str):
            return None if num_blocks is None else num_blocks - (b == BLOCKS_BUT_LAST)
        return b

    if isinstance(value, str):
        if limits.get("choices") and value not in limits["choices"]:
            listed = ", ".join(map(repr, limits["choices"])) + (", or a list of blocks" if limits.get("blocks") else "")
            raise ValueError(f"must be one of {listed}")
        return
    if limits.get("blocks") and value is not None:
        layers = (value,) if isinstance(value, int) else value
        if not layers:
            raise ValueError("give at least one block")
        if len(set(layers)) != len(layers):
            raise ValueError("names a block twice")
        top = bound(limits.get("max") or BLOCKS)
        if any(not 1 <= layer <= (math.inf if top is None else top) for layer in layers):
            raise ValueError(f"must be blocks in 1..{top}")
        return
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        low, high, above = bound(limits.get("min")), bound(limits.get("max")), limits.get("above")
        if low is not None and value < low:
            raise ValueError(f"must be at least {low}")
        if high is not None and value > high:
            raise ValueError(f"must be at most {high}")
        if above is not None and value <= above:
            raise ValueError(f"must be greater than {above}")
