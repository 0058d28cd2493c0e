"""The form's training options, made from the settings schema (tinv_gui.schema): one control
per TrainSettings field the form offers, with the field's label, help, range and choices, and
the way back from the form's values to TrainSettings keywords."""

from __future__ import annotations

import dataclasses
import math

import gradio as gr

from ..methods import METHODS
from ..schema import Kind, SettingsError, Spec, check_value, described_fields
from ..settings import TrainSettings


def option_fields() -> list[tuple[str, Spec, Kind]]:
    """(name, spec, kind) of each TrainSettings field the Advanced accordion offers, in order."""
    return [(f.name, spec, kind) for f, spec, kind in described_fields(TrainSettings) if spec.form]


def option_defaults(method: str) -> dict:
    """The value each option shows for `method`: its published default, else the field's own."""
    defaults = {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                for f, spec, kind in described_fields(TrainSettings) if spec.form}
    return {**defaults, **METHODS[method].defaults}


def option_component(name: str, spec: Spec, kind: Kind, default):
    """The Advanced control for one TrainSettings field, with its label and help."""
    info = spec.help
    if spec.methods and len(spec.methods) < len(METHODS):
        info += " (" + ", ".join(METHODS[m].preset.label for m in spec.methods) + ")"
    common = dict(label=spec.label, info=info, min_width=220, elem_id=f"option-{name}")
    if kind.choices:
        return gr.Dropdown(list(kind.choices), value=default, **common)
    if spec.suggestions:
        return gr.Dropdown(list(spec.suggestions), value=default, allow_custom_value=True, **common)
    if kind.base is bool:
        return gr.Checkbox(bool(default), **common)
    if kind.base in (int, float):
        # A number left to the method or model (None) shows as 0, and 0 is read back as None.
        low = 0 if kind.optional else next((v for v in (spec.ge, spec.gt) if v is not None), None)
        high = spec.le if spec.le is not None else spec.lt
        if kind.optional and not _takes(spec, kind, 0):
            common["info"] += " 0: the default."
        step = dict(precision=0) if kind.base is int else dict(step=0.001)
        return gr.Number(0 if default is None else default, minimum=low, maximum=high, **step, **common)
    if kind.is_list:  # one value per line
        return gr.Textbox("\n".join(default or []), lines=2, **common)
    return gr.Textbox(default or "", **common)


def _takes(spec: Spec, kind: Kind, value) -> bool:
    try:
        check_value("", value, spec, kind)
    except SettingsError:
        return False
    return True


def whole_number(name: str, value):
    """A form number as an int when it is whole (the form sends 10.0 for 10); else a message."""
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise SettingsError(name, f"must be a whole number, not {value}")
        return int(value)
    return value


def settings_from_form(method: str, values: dict) -> dict:
    """TrainSettings keyword arguments from the form: a value equal to the method's default is
    left as None, so the method (not the form) decides, e.g. per phase of a two-phase run."""
    defaults = METHODS[method].defaults if method in METHODS else {}
    described = {f.name: (f, spec, kind) for f, spec, kind in described_fields(TrainSettings)}
    out = {}
    for name, value in values.items():
        if name not in described or value is None or value == "":
            continue
        field, spec, kind = described[name]
        if kind.is_list and isinstance(value, str):  # the form's one value per line
            value = [line.strip() for line in value.splitlines() if line.strip()]
            if not value:
                continue
        if kind.base is int and not kind.choices:
            value = whole_number(name, value)
        if field.default is None and name in defaults and value == defaults[name]:
            continue
        if field.default is None and value == 0 and not _takes(spec, kind, 0):
            continue  # 0 on the form, where 0 is no value of its own: leave it to the method or the model
        out[name] = value
    return out
