"""What a host sets through TINV_GUI_* environment variables (README, "Running on Hugging Face Spaces").

Every number a host may set is read here, through `host_number`, against one table of what it
accepts. A value that cannot be meant (a word, a negative count, an empty string, a fraction
of a picture) is refused with a message naming the variable, the value and what it accepts;
app.py checks them all before anything heavy loads and stops with that message. (A limit read
as 0 would refuse every call; an unreadable one was a ValueError deep in an import.)
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass


class HostSettingError(ValueError):
    """A TINV_GUI_* environment variable holds a value it does not accept."""


@dataclass(frozen=True)
class Accepted:
    """What a variable takes: a whole number, or any number, of at least `least` (above it when `strict`)."""

    default: float
    whole: bool = True
    least: float = 1
    strict: bool = False

    def text(self) -> str:
        if self.whole:
            return f"a whole number of {self.least:g} or more"
        return f"a number above {self.least:g}" if self.strict else f"a number of {self.least:g} or more"

    def takes(self, value: float) -> bool:
        above = value > self.least if self.strict else value >= self.least
        return math.isfinite(value) and above and (value.is_integer() or not self.whole)


# The table README's "Limits a host can set" lists, with the same defaults.
NUMBERS = {
    "TINV_GUI_MAX_STEPS": Accepted(3000),
    "TINV_GUI_MAX_JOB_MINUTES": Accepted(60, whole=False, least=0, strict=True),
    "TINV_GUI_LEFT_GRACE_SECONDS": Accepted(120, whole=False, least=0),  # 0: stop at once
    "TINV_GUI_VISITOR_AT_ONCE": Accepted(2),
    "TINV_GUI_VISITOR_CALLS": Accepted(60),  # 0 would refuse every call
    "TINV_GUI_VISITOR_WINDOW_MINUTES": Accepted(10, whole=False, least=0, strict=True),
    "TINV_GUI_MAX_PICTURES": Accepted(100),
    "TINV_GUI_MAX_UNPACKED_MB": Accepted(500, least=0),  # 0: zips are not unpacked
    "TINV_GUI_PICTURE_SIDE": Accepted(1024, least=64),  # smaller pictures are refused (dataset.MIN_SIDE)
    "TINV_GUI_VISITOR_HOURS": Accepted(24, whole=False, least=0, strict=True),
    "TINV_GUI_MAX_GPU_SECONDS": Accepted(1500),
}
YES, NO = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def host_number(name: str) -> int | float:
    """The number the host set in `name` (a NUMBERS key), else its default; an int when it
    takes whole numbers. HostSettingError when the value is not one it takes."""
    accepted = NUMBERS[name]
    text = os.environ.get(name)
    if text is None:
        return int(accepted.default) if accepted.whole else float(accepted.default)
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not accepted.takes(value):
        raise HostSettingError(f"{name} must be {accepted.text()}, not {text!r} (unset, it is {accepted.default:g})")
    return int(value) if accepted.whole else value


def host_flag(name: str) -> bool:
    """Whether the host switched `name` on (1, true, yes, on; unset, empty, 0, false, no, off:
    off). HostSettingError for anything else: "TINV_GUI_SHARED=0" must not mean on."""
    text = os.environ.get(name, "")
    if text.strip().lower() not in YES + NO:
        raise HostSettingError(f"{name} must be 1 (or true, yes, on) or 0 (or false, no, off), not {text!r}")
    return text.strip().lower() in YES


def check_host_settings() -> None:
    """Read every variable of the table (and TINV_GUI_SHARED): one HostSettingError naming
    each that holds a value it does not take."""
    problems = []
    for read, name in [(host_number, name) for name in NUMBERS] + [(host_flag, "TINV_GUI_SHARED")]:
        try:
            read(name)
        except HostSettingError as error:
            problems.append(str(error))
    if problems:
        raise HostSettingError("\n".join(problems))
