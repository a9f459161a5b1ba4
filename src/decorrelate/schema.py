"""The one configuration machinery, for any option dataclass declared with :func:`~.options.opt`.

An option set (a "schema": :class:`~decorrelate.config.TrainConfig`,
:class:`~decorrelate.fixedpoint.config.FixedPointConfig`) is a dataclass deriving from
:class:`Options` whose fields are declared with ``opt()``. This module gives every such schema
the same behaviour:

* :func:`make` merges mappings of options (defaults < a YAML/JSON file < flags < extras; keys
  with dashes or underscores), rejects unknown keys with the list of valid ones, coerces values
  from text (:func:`coerce`) and validates choices and ranges (:func:`validate`), each mistake
  one line (a :class:`~decorrelate.errors.UserError`);
* :func:`load_config_file` reads a YAML or JSON mapping, refusing a key written twice;
* :func:`add_flags` generates one command-line flag per field (``--x/--no-x`` for bools) and
  :func:`given_flags` reads back the ones that were given.

A schema customises two hooks: :meth:`Options.prepare` (rewrite the merged values before the
dataclass is built, e.g. expand shorthands) and :meth:`Options.check` (constraints between
fields).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from .errors import UserError
from .options import default_of, is_option

T = TypeVar("T", bound="Options")


class Options:
    """Base of the option dataclasses: build, copy and validate through this module."""

    @classmethod
    def prepare(cls, values: dict[str, Any]) -> dict[str, Any]:
        """Rewrite the merged, coerced values before the dataclass is built (default: as is)."""
        return values

    def check(self) -> None:
        """Constraints between fields; raise a one-line :class:`UserError` (default: none)."""

    @classmethod
    def make(cls: type[T], *layers: Mapping[str, Any] | None) -> T:
        """Defaults < ``layers`` (later ones win), coerced and validated: see :func:`make`."""
        return make(cls, *layers)

    def replace(self: T, **changes: Any) -> T:
        """A validated copy with ``changes`` applied (keys may use dashes or underscores)."""
        return make(type(self), self.to_dict(), changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


@functools.cache
def fields_of(schema: type) -> dict[str, dataclasses.Field]:
    """The ``opt()`` fields of ``schema`` by name, in declaration order."""
    return {f.name: f for f in dataclasses.fields(schema) if is_option(f)}


def choices_of(schema: type, name: str) -> tuple[str, ...] | None:
    """The valid values of option ``name`` (None: any value of its kind)."""
    c = fields_of(schema)[name].metadata["choices"]
    return c() if callable(c) else c


def defaults(schema: type) -> dict[str, Any]:
    """Every option of ``schema`` at its default."""
    return {name: default_of(f) for name, f in fields_of(schema).items()}


def flag(name: str) -> str:
    """The spelling of option ``name`` in messages and on the command line (dashes)."""
    return name.replace("_", "-")


# ----------------------------------------------------------------------------- parsing


def normalise_key(key: Any) -> str:
    return str(key).strip().replace("-", "_")


def _bad(name: str, value: Any, why: str) -> UserError:
    return UserError(f"invalid value for {flag(name)}: {value!r} ({why})")


def coerce(schema: type, name: str, value: Any) -> Any:
    """Convert ``value`` (from a file or the command line) to the field's kind, or raise."""
    meta = fields_of(schema)[name].metadata
    kind = meta["kind"]
    value = _alias(meta["aliases"], value)
    if value is None or (
        isinstance(value, str) and value.strip().lower() in ("none", "null") and meta["optional"]
    ):
        if meta["optional"]:
            return None
        raise _bad(name, value, "a value is required")
    try:
        if kind == "str":
            if not isinstance(value, str):
                raise TypeError("expected a string")
            return value
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if kind in ("int", "float"):
            return _number(value, kind)
        if kind in ("ints", "floats"):
            items = value.split(",") if isinstance(value, str) else value
            if not isinstance(items, (list, tuple)):
                raise TypeError("expected a list")
            return [
                _number(v, kind[:-1]) for v in items if not (isinstance(v, str) and not v.strip())
            ]
    except (TypeError, ValueError) as err:
        raise _bad(name, value, str(err)) from None
    raise AssertionError(kind)


def _alias(aliases: dict[Any, Any], value: Any) -> Any:
    """The current spelling of ``value`` (booleans also given as true/false/yes/no/1/0)."""
    if not aliases:
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("true", "yes", "on", "1"):
            value = True
        elif text in ("false", "no", "off", "0"):
            value = False
    if isinstance(value, bool) and value in aliases:
        return aliases[value]
    return value


def _number(value: Any, kind: str) -> int | float:
    if isinstance(value, bool):
        raise TypeError(f"expected {'an integer' if kind == 'int' else 'a number'}")
    if kind == "int":
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            return int(value.strip())
        raise TypeError("expected an integer")
    number = float(value.strip()) if isinstance(value, str) else float(value)
    if not math.isfinite(number):
        raise ValueError("must be finite")
    return number


def check_value(schema: type, name: str, value: Any) -> None:
    """Refuse a coerced ``value`` of option ``name`` outside its range or choices (one line)."""
    if value is None:
        return
    meta = fields_of(schema)[name].metadata
    check = meta["check"]
    if check is not None:
        why = check(value)
        if why:
            raise _bad(name, value, why)
    choices = choices_of(schema, name)
    if choices is not None and value not in choices:
        raise UserError(
            f"invalid value for {flag(name)}: {value!r}; choose one of: {', '.join(choices)}"
        )


def validate(config: T) -> T:
    """Check choices and ranges of every field, then :meth:`Options.check`; one-line errors."""
    for name in fields_of(type(config)):
        check_value(type(config), name, getattr(config, name))
    config.check()
    return config


def check_no_repeats(keys: Iterable[Any], where: str) -> None:
    """Refuse a layer that names one option twice (``batch_size`` and ``batch-size``)."""
    seen: dict[str, Any] = {}
    for key in keys:
        name = normalise_key(key)
        if name in seen:
            same = "" if key == seen[name] else f" (as {seen[name]!r} and {key!r})"
            raise UserError(f"option {flag(name)} is given twice in {where}{same}")
        seen[name] = key


def merge(schema: type, *layers: Mapping[str, Any] | None) -> dict[str, Any]:
    """The options named in ``layers`` (later ones win), coerced; unknown keys refused."""
    fields = fields_of(schema)
    values: dict[str, Any] = {}
    for layer in layers:
        check_no_repeats((layer or {}).keys(), "one set of options")
        for key, value in (layer or {}).items():
            name = normalise_key(key)
            if name not in fields:
                raise UserError(
                    f"unknown option {key!r}; valid options: {', '.join(map(flag, fields))}"
                )
            values[name] = coerce(schema, name, value)
    return values


def make(schema: type[T], *layers: Mapping[str, Any] | None) -> T:
    """Merge mappings of options (later ones win) over the defaults, coerce and validate.

    Within one mapping an option may appear once: two spellings of it would leave which one
    wins to the mapping's order.
    """
    return validate(schema(**schema.prepare(merge(schema, *layers))))


# ----------------------------------------------------------------------------- files


class _Pairs(list):
    """A parsed mapping kept as its (key, value) pairs, in file order, repeats included."""


def _yaml_pairs(text: str) -> Any:
    """``yaml.safe_load``, but every mapping comes back as its list of (key, value) pairs, so a
    key written twice is seen (PyYAML would keep the last silently)."""
    import yaml

    class PairLoader(yaml.SafeLoader):
        pass

    def pairs(loader: yaml.SafeLoader, node: yaml.MappingNode) -> _Pairs:
        loader.flatten_mapping(node)
        return _Pairs(
            (loader.construct_object(k, deep=True), loader.construct_object(v, deep=True))
            for k, v in node.value
        )

    PairLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, pairs)
    return yaml.load(text, Loader=PairLoader)  # a SafeLoader subclass: plain data only


def load_config_file(path: str | Path, shipped: Path | None = None) -> dict[str, Any]:
    """Read a YAML or JSON mapping of options (no validation yet: see :func:`make`).

    With ``shipped`` (a directory), a bare name that is not a file, e.g. ``np-authors``, is
    looked up as ``NAME.yaml`` there.
    """
    path = Path(path)
    if shipped is not None and not path.exists() and path.parent == Path(".") and not path.suffix:
        candidate = shipped / f"{path.name}.yaml"
        if candidate.is_file():
            path = candidate
    try:
        raw = path.read_bytes()
    except OSError as err:
        names = ", ".join(sorted(f.stem for f in shipped.glob("*.yaml"))) if shipped else ""
        shipped_hint = f" (shipped configs: {names})" if names and not path.suffix else ""
        raise UserError(
            f"cannot read config file {path}: {err.strerror or err}{shipped_hint}"
        ) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(
            f"config file {path} is not UTF-8 text (byte 0x{raw[err.start]:02x} at offset "
            f"{err.start}); save it as UTF-8"
        ) from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text, object_pairs_hook=_Pairs)
        else:
            data = _yaml_pairs(text)
    except Exception as err:  # malformed file: report it in one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot parse config file {path}: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, _Pairs):
        raise UserError(f"config file {path} must hold a mapping of option: value")
    check_no_repeats((key for key, _ in data), f"config file {path}")
    return {key: _plain(value) for key, value in data}


def _plain(value: Any) -> Any:
    """A nested mapping (pairs) becomes a dict again (option values are scalars or lists)."""
    if isinstance(value, _Pairs):
        return {k: _plain(v) for k, v in value}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


# ----------------------------------------------------------------------------- flags


def add_flags(
    parser: argparse.ArgumentParser, schema: type, help_extra: Mapping[str, str] | None = None
) -> None:
    """One flag per option of ``schema``; defaults suppressed so only given flags override.

    Flags are grouped by the options' ``group``. Values are taken as text and coerced and
    validated with the rest (:func:`make`), so a file value and a flag value are read alike.
    ``help_extra`` appends words to an option's help (how a command reads it, e.g. lists).
    """
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, f in fields_of(schema).items():
        meta = f.metadata
        group = groups.setdefault(
            meta["group"], parser.add_argument_group(f"{meta['group']} options")
        )
        option = "--" + flag(name)
        help_text = meta["help"] + (help_extra or {}).get(name, "")
        if "default" not in help_text:  # a help that explains its default says it once
            help_text += f" (default: {_show(default_of(f))})"
        if meta["kind"] == "bool":
            group.add_argument(
                option,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
            continue
        choices = choices_of(schema, name)
        metavar = "{" + ",".join(choices) + "}" if choices else meta["kind"].upper()
        group.add_argument(option, default=argparse.SUPPRESS, metavar=metavar, help=help_text)
        if False in meta["aliases"]:  # a former bool option: keep its --no-X spelling
            group.add_argument(
                "--no-" + option[2:],
                dest=name,
                action="store_const",
                const=meta["aliases"][False],
                default=argparse.SUPPRESS,
                help=f"same as {option} {meta['aliases'][False]}",
            )


def given_flags(args: argparse.Namespace, schema: type) -> dict[str, Any]:
    """The options of ``schema`` that were given as flags (see :func:`add_flags`)."""
    return {name: getattr(args, name) for name in fields_of(schema) if hasattr(args, name)}


def _show(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)
