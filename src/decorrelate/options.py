"""How an option is declared: :func:`opt` and the small range checks that go with it.

An option set ("schema") is a dataclass whose fields are declared with :func:`opt`; the field's
metadata says what the command line, the config-file reader and the validator need to know (help
text, kind, choices, range check). The machinery that reads, merges, validates and turns them
into flags is :mod:`decorrelate.schema`; this module imports nothing of the package, so a rule
module can declare its options beside the rule without import cycles.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

#: The kinds of value an option can hold (``ints``/``floats``: lists, also given as "1,2,3").
KINDS = ("str", "int", "float", "bool", "ints", "floats")

Check = Callable[[Any], "str | None"]


def opt(
    default: Any,
    help: str,
    kind: str,
    *,
    choices: Callable[[], tuple[str, ...]] | tuple[str, ...] | None = None,
    check: Check | None = None,
    optional: bool = False,
    group: str = "training",
    code: Callable[[Any], bool] | None = None,
    aliases: dict[Any, Any] | None = None,
) -> Any:
    """A dataclass field with what the CLI and the validator need to know about it.

    ``choices`` (a tuple, or a function returning one, so a registry can be read late) lists the
    valid values; ``check(value)`` returns why a value is refused (or None) and, when both are
    given, is asked first, so it can explain a refusal better than the list of choices.
    ``optional``: None is allowed. ``group`` titles the option's section of ``--help``.
    ``code(value)`` is true when the value names Python code to import (see
    :func:`decorrelate.config.code_references`). ``aliases`` maps earlier spellings of a value
    (e.g. the booleans of a former bool option) to the current one, so old config files and
    saved runs keep loading.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown option kind {kind!r}; one of {', '.join(KINDS)}")
    meta = {
        "help": help,
        "kind": kind,
        "choices": choices,
        "check": check,
        "optional": optional,
        "group": group,
        "code": code,
        "aliases": aliases or {},
    }
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def is_option(f: dataclasses.Field) -> bool:
    """True for a field declared with :func:`opt`."""
    return "kind" in f.metadata


def default_of(f: dataclasses.Field) -> Any:
    """The default value of a field (a fresh list for list defaults)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise ValueError(f"option {f.name} has no default")


# ----------------------------------------------------------------------------- checks


def positive(v: Any) -> str | None:
    return None if v > 0 else "must be > 0"


def non_negative(v: Any) -> str | None:
    return None if v >= 0 else "must be >= 0"


def fraction_open(v: float) -> str | None:
    return None if 0 <= v < 1 else "must be in [0, 1)"


def fraction_closed(v: float) -> str | None:
    return None if 0 < v <= 1 else "must be in (0, 1]"


def all_positive(v: list) -> str | None:
    return None if all(x > 0 for x in v) else "all entries must be > 0"


def betas_ok(v: list) -> str | None:
    return None if len(v) == 2 and all(0 <= b < 1 for b in v) else "must be two numbers in [0, 1)"


def at_least(low: float) -> Check:
    """A check: the value is >= ``low``."""
    return lambda v: None if v >= low else f"must be >= {low:g}"
