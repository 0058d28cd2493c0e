"""Settings described once: each field of a settings dataclass carries a `Spec` (label, help,
range, which methods use it, its command-line flag), and everything else is generated from it:
the checks (`check_fields`), the command-line flags (`add_arguments`, `from_args`) and the
app's form (tinv_gui.ui.options). Adding a setting is one field with one `setting(...)`.

The field's type annotation is part of the description: `int`, `float`, `bool`, `str`,
`Literal[...]` for a fixed set of choices, `X | None` when None means "the method's (or the
model's) default", `list[...]` for repeatable values.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

MAX_TEXT = 2000  # characters of a prompt, caption or word: CLIP reads 77 tokens; more is a mistake or an attack
MAX_PATH = 4096


class SettingsError(ValueError):
    """A setting is out of range; `field` names it."""

    def __init__(self, field_name: str, message: str):
        self.field = field_name
        super().__init__(f"{field_name}: {message}")


@dataclass(frozen=True)
class Spec:
    """What a settings field means and which values it takes (beyond its type)."""

    label: str  # the form's label
    help: str  # one or two plain sentences, for the form and the command line
    ge: float | None = None  # at least
    gt: float | None = None  # above
    le: float | None = None  # at most
    lt: float | None = None  # below
    multiple_of: int | None = None
    max_length: int | None = None  # characters; text defaults to MAX_TEXT, paths to MAX_PATH
    if_blank: str | None = None  # a text that may not be blank: what to say when it is
    path: Literal["file", "output_file", "folder"] | None = None  # file: must exist; output_file: not a folder
    suffixes: tuple[str, ...] = ()  # the file suffixes a path may have
    methods: tuple[str, ...] | None = None  # the methods that use it; None: every one
    suggestions: tuple[str, ...] = ()  # common values of a free text (the form offers them)
    flag: str | None = None  # the command-line flag; default --field-name; "" for none
    repeat: Literal["nargs", "append"] | None = None  # a list on the command line: --x a b, or --x a --x b
    required: bool = False  # on the command line
    form: bool = True  # offered among the app's options (where the class has a form)

    @property
    def bounds(self) -> str:
        """The range in words ("at least 1", "above 0 and below 10"), or ""."""
        parts = [f"{word} {_number(v)}" for word, v in (("above", self.gt), ("at least", self.ge), ("below", self.lt), ("at most", self.le)) if v is not None]
        return " and ".join(parts)


def setting(default=None, *, default_factory=None, **spec) -> typing.Any:
    """A dataclass field described by a Spec (keyword arguments of Spec)."""
    metadata = {"spec": Spec(**spec)}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Kind:
    """A field's annotation taken apart: its base type, whether None is allowed, its choices."""

    base: type
    optional: bool = False
    choices: tuple = ()
    is_list: bool = False


def _kind(annotation) -> Kind:
    optional = False
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        annotation = args[0] if len(args) == 1 else object
    if typing.get_origin(annotation) is Literal:
        choices = typing.get_args(annotation)
        return Kind(type(choices[0]), optional, choices)
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        return dataclasses.replace(_kind(item), optional=optional, is_list=True)
    return Kind(annotation if isinstance(annotation, type) else object, optional)


@functools.cache
def described_fields(cls) -> tuple[tuple[dataclasses.Field, Spec, Kind], ...]:
    """(field, spec, kind) of each described field of a settings class, in declaration order."""
    hints = typing.get_type_hints(cls)
    return tuple((f, f.metadata["spec"], _kind(hints[f.name])) for f in dataclasses.fields(cls) if "spec" in f.metadata)


def field_spec(cls, name: str) -> tuple[Spec, Kind]:
    for f, spec, kind in described_fields(cls):
        if f.name == name:
            return spec, kind
    raise KeyError(name)


def _number(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------
def check_fields(settings) -> None:
    """Check every described field of `settings` against its type and Spec; raises SettingsError
    naming the first bad one."""
    for f, spec, kind in described_fields(type(settings)):
        check_value(f.name, getattr(settings, f.name), spec, kind)


def check_value(name: str, value, spec: Spec, kind: Kind) -> None:
    if value is None:
        return  # None is "the default", or a missing value the class's own checks name
    if kind.is_list:
        if not isinstance(value, (list, tuple)):
            value = [value]
        for item in value:
            check_value(name, item, spec, dataclasses.replace(kind, is_list=False))
        return
    if kind.choices:
        if value not in kind.choices:
            raise SettingsError(name, f"{value!r} is not one of {', '.join(map(str, kind.choices))}")
        return
    if kind.base is bool:
        if not isinstance(value, bool):
            raise SettingsError(name, f"must be true or false, not {value!r}")
    elif kind.base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SettingsError(name, f"must be a whole number, not {value!r}")
        _check_range(name, value, spec)
    elif kind.base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SettingsError(name, f"must be a number, not {value!r}")
        if not math.isfinite(value):
            raise SettingsError(name, f"must be a finite number, not {value!r}")
        _check_range(name, value, spec)
    elif kind.base is str:
        _check_text(name, value, spec)
    elif isinstance(value, (str, Path)):  # object fields (pictures: a path or a list of paths)
        _check_text(name, str(value), spec)


def _check_range(name: str, value, spec: Spec) -> None:
    inside = (
        (spec.ge is None or value >= spec.ge)
        and (spec.gt is None or value > spec.gt)
        and (spec.le is None or value <= spec.le)
        and (spec.lt is None or value < spec.lt)
    )
    if not inside:
        raise SettingsError(name, f"must be {spec.bounds}, not {_number(value)}")
    if spec.multiple_of and value % spec.multiple_of:
        raise SettingsError(name, f"must be a multiple of {spec.multiple_of}, not {_number(value)}")


def _check_text(name: str, value, spec: Spec) -> None:
    if not isinstance(value, str):
        raise SettingsError(name, f"must be text, not {type(value).__name__}")
    limit = spec.max_length or (MAX_PATH if spec.path else MAX_TEXT)
    if len(value) > limit:
        raise SettingsError(name, f"is {len(value):,} characters long; at most {limit:,} are taken")
    if spec.if_blank and not value.strip():
        raise SettingsError(name, spec.if_blank)
    if "\x00" in value:
        raise SettingsError(name, "contains a NUL character")
    if spec.path and value.strip():
        _check_path(name, Path(value), spec)


def _check_path(name: str, path: Path, spec: Spec) -> None:
    suffixes = " or ".join(spec.suffixes)
    if spec.path == "file":
        if not path.is_file():
            raise SettingsError(name, f"{path} is not a file")
        if spec.suffixes and path.suffix.lower() not in spec.suffixes:
            raise SettingsError(name, f"{path.name} is not a {suffixes} file")
    elif spec.path == "output_file":
        if path.is_dir():
            raise SettingsError(name, f"{path} is a folder; name a file{' ending in ' + suffixes if suffixes else ''}")
        if spec.suffixes and path.suffix.lower() not in spec.suffixes:
            raise SettingsError(name, f"{path.name} does not end in {suffixes}; name the file to write, e.g. out{spec.suffixes[0]}")
    elif spec.path == "folder" and path.is_file():
        raise SettingsError(name, f"{path} is a file; name a folder for the results")


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------
def flag_of(name: str, spec: Spec) -> str:
    return spec.flag if spec.flag is not None else "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, cls, defaults_note: typing.Callable[[str], str] | None = None) -> None:
    """One flag per described field of `cls` (those with a flag). `defaults_note(name)` may add
    words on where a None default comes from (the method's defaults)."""
    for f, spec, kind in described_fields(cls):
        if spec.flag == "":
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        help_text = spec.help.replace("%", "%%")
        if spec.methods:
            help_text = f"[{', '.join(spec.methods)}] {help_text}"
        note = defaults_note(f.name) if defaults_note else ""
        if note:
            help_text += f" (default: {note})"
        elif default not in (None, "", [], False) and not spec.required:
            help_text += f" (default: {_number(default)})"
        kwargs: dict = dict(dest=f.name, help=help_text, default=default)
        if spec.required:
            kwargs["required"] = True
        if kind.base is bool and not kind.choices:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            if kind.choices:
                kwargs["choices"] = kind.choices
            if kind.base in (int, float):
                kwargs["type"] = kind.base
            if spec.repeat == "nargs":
                kwargs["nargs"] = "+"
            elif spec.repeat == "append":
                kwargs["action"] = "append"
                kwargs["default"] = None
            if not kind.choices:
                kwargs["metavar"] = ("DIR" if spec.path == "folder" else "FILE") if spec.path else flag_of(f.name, spec).lstrip("-").replace("-", "_").upper()
        parser.add_argument(flag_of(f.name, spec), **kwargs)


def from_args(cls, args: argparse.Namespace):
    """The settings object of `cls` from parsed arguments (add_arguments' flags)."""
    values = {}
    for f, spec, kind in described_fields(cls):
        if spec.flag == "" or not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        if spec.repeat == "append" and value is None and f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        if spec.repeat == "nargs" and not kind.is_list and isinstance(value, list) and len(value) == 1:
            value = value[0]  # one folder or file, as the engine takes it
        values[f.name] = value
    return cls(**values)
