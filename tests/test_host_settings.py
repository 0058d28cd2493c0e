"""A host's TINV_GUI_* settings (README, "Running on Hugging Face Spaces"): a value that cannot
be meant stops the app at start with a message naming the variable, the value and what it
takes, never a traceback or a limit that quietly refuses everything."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tinv_gui.ui.host import (
    NUMBERS,
    HostSettingError,
    check_host_settings,
    host_flag,
    host_number,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def no_host_settings(monkeypatch):
    """Each test starts from a host that set nothing."""
    for name in [*NUMBERS, "TINV_GUI_SHARED"]:
        monkeypatch.delenv(name, raising=False)


def test_bad_settings_stop_the_app_at_start_naming_each_without_a_traceback():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TINV_GUI_VISITOR_CALLS": "abc", "TINV_GUI_MAX_PICTURES": "-5",
           "TINV_GUI_MAX_STEPS": "", "TINV_GUI_SHARED": "maybe", "GRADIO_SERVER_PORT": "1"}  # port 1: it must not get that far
    started = subprocess.run([sys.executable, "app.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert started.returncode == 1 and "Traceback" not in started.stderr, started.stderr
    for line in (
        "TINV_GUI_VISITOR_CALLS must be a whole number of 1 or more, not 'abc' (unset, it is 60)",
        "TINV_GUI_MAX_PICTURES must be a whole number of 1 or more, not '-5' (unset, it is 100)",
        "TINV_GUI_MAX_STEPS must be a whole number of 1 or more, not '' (unset, it is 3000)",
        "TINV_GUI_SHARED must be 1 (or true, yes, on) or 0 (or false, no, off), not 'maybe'",
    ):
        assert line in started.stderr.splitlines(), started.stderr


@pytest.mark.parametrize(("name", "value"), [
    ("TINV_GUI_VISITOR_CALLS", "0"),  # would refuse every call
    ("TINV_GUI_VISITOR_CALLS", "2.5"),
    ("TINV_GUI_VISITOR_AT_ONCE", "nan"),
    ("TINV_GUI_PICTURE_SIDE", "32"),  # every picture would be smaller than the least one kept
    ("TINV_GUI_MAX_JOB_MINUTES", "0"),
    ("TINV_GUI_VISITOR_HOURS", "inf"),
    ("TINV_GUI_LEFT_GRACE_SECONDS", "-1"),
    ("TINV_GUI_MAX_GPU_SECONDS", "1500s"),
])
def test_a_value_a_setting_does_not_take_is_refused_naming_it(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(HostSettingError, match=f"^{name} must be .*, not {re.escape(repr(value))}"):
        host_number(name)
    with pytest.raises(HostSettingError, match=name):
        check_host_settings()


def test_values_a_host_may_mean_are_taken(monkeypatch):
    assert host_number("TINV_GUI_VISITOR_CALLS") == 60 and isinstance(host_number("TINV_GUI_VISITOR_CALLS"), int)
    for name, text, value in (
        ("TINV_GUI_VISITOR_CALLS", " 5 ", 5), ("TINV_GUI_MAX_STEPS", "1e3", 1000), ("TINV_GUI_MAX_JOB_MINUTES", "0.5", 0.5),
        ("TINV_GUI_LEFT_GRACE_SECONDS", "0", 0.0), ("TINV_GUI_MAX_UNPACKED_MB", "0", 0),  # no grace; no zips unpacked
    ):
        monkeypatch.setenv(name, text)
        assert host_number(name) == value
    check_host_settings()
    for text, shared in (("1", True), ("yes", True), ("0", False), ("off", False), ("", False)):
        monkeypatch.setenv("TINV_GUI_SHARED", text)
        assert host_flag("TINV_GUI_SHARED") is shared


def test_tinv_gui_shared_0_leaves_the_app_unshared(monkeypatch, tmp_path):
    from tinv_gui.ui.app import TinvApp
    from tinv_gui.ui.workspace import Workspaces

    monkeypatch.delenv("SPACE_ID", raising=False)
    for text, shared in (("0", False), ("1", True)):
        monkeypatch.setenv("TINV_GUI_SHARED", text)
        app = TinvApp(workspaces=Workspaces(tmp_path / "visitors"), hub=(False, "offline"))
        app.engine.close()
        assert app.shared is shared and (app.visitor_limits is not None) is shared


def test_the_readme_lists_every_setting_with_its_default():
    readme = (ROOT / "README.md").read_text()
    rows = dict(re.findall(r"^\| `(TINV_GUI_\w+)` \| ([\d.]+) \|", readme, re.MULTILINE))
    assert {name: float(default) for name, default in rows.items()} == {name: a.default for name, a in NUMBERS.items()}
