"""Every value is checked where it enters: the settings schema, once, naming the setting. The
command line's flags and the app's option controls are made from the same description."""

import dataclasses
import math
import types

import pytest

from tinv_gui import cli
from tinv_gui.methods import METHODS
from tinv_gui.schema import described_fields
from tinv_gui.settings import (
    EvalSettings,
    GenerateSettings,
    PromptSettings,
    SettingsError,
    TrainSettings,
)


def run(capsys, *argv) -> tuple[int, str]:
    """The command line in this process (the checks come before any model loads)."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse's own refusals
        code = exit_.code
    return code, capsys.readouterr().err


@pytest.fixture
def prompt_file(tmp_path):
    return tmp_path / "p.safetensors"


def generate(tmp_path, *extra):
    return ("generate", "--model", "demo", "--prompt", "a cube", "--output", tmp_path / "out.png", *extra)


def train(picture_dir, tmp_path, *extra):
    return ("train", "--model", "demo", "--images", picture_dir, "--token", "<x>", "--output", tmp_path / "o", *extra)


@pytest.mark.parametrize(
    "extra, name",
    [
        (("--steps", "0"), "steps"),  # was a ZeroDivisionError after loading the model
        (("--guidance", "nan"), "guidance"),  # was accepted
        (("--guidance", "inf"), "guidance"),
        (("--seed", str(2**70)), "seed"),  # was "Overflow when unpacking long long"
        (("--seed", "-1"), "seed"),
        (("--size", "100000x512"), "size"),
    ],
)
def test_generate_refuses_bad_numbers_naming_them(capsys, tmp_path, extra, name):
    code, err = run(capsys, *generate(tmp_path, *extra))
    assert code == 2 and err.startswith(f"error: {name}:"), err
    assert "Traceback" not in err and not (tmp_path / "out.png").exists()


def test_generate_output_must_be_a_picture_file(capsys, tmp_path):
    # Both used to fail with a traceback after the picture was drawn.
    for output in (tmp_path, tmp_path / "picture"):
        code, err = run(capsys, "generate", "--model", "demo", "--prompt", "a cube", "--output", output)
        assert code == 2 and err.startswith("error: output:") and output.name in err, err
    code, err = run(capsys, "generate", "--model", "demo", "--prompt", "a cube", "--output", tmp_path / "picture.txt")
    assert code == 2 and ".png" in err


def test_generate_names_a_prompt_embeds_file_it_cannot_use(capsys, tmp_path):
    evil = tmp_path / "evil.pt"
    evil.write_bytes(b"\x80\x02not really a pickle")
    code, err = run(capsys, "generate", "--model", "demo", "--prompt-embeds", evil, "--output", tmp_path / "out.png")
    assert code == 2 and err.startswith("error: prompt_embeds:") and "evil.pt" in err, err
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(b"\xff" * 64)
    code, err = run(capsys, "generate", "--model", "demo", "--prompt-embeds", fake, "--output", tmp_path / "out.png")
    assert code == 2 and "fake.safetensors" in err and "Traceback" not in err, err


def test_a_huge_prompt_is_refused_at_once(capsys, tmp_path):
    code, err = run(capsys, *generate(tmp_path)[:3], "--prompt", "x" * 10_000_000, "--output", tmp_path / "out.png")
    assert code == 2 and err.startswith("error: prompt:") and "10,000,000 characters" in err


@pytest.mark.parametrize(
    "extra, name",
    [
        (("--weight-decay", "inf"), "weight_decay"),  # was accepted, then blamed on the learning rate
        (("--lr", "nan"), "lr"),
        (("--seed", str(2**70)), "seed"),
        (("--resolution", "100000"), "resolution"),  # was blamed on the picture
        (("--grad-clip", "nan"), "grad_clip"),
        (("--crops", "0"), "crops"),
        (("--vectors", "76"), "vectors"),
    ],
)
def test_train_refuses_bad_numbers_naming_them(capsys, picture_dir, tmp_path, extra, name):
    code, err = run(capsys, *train(picture_dir, tmp_path, *extra))
    assert code == 2 and err.startswith(f"error: {name}:"), err
    assert not (tmp_path / "o").exists()


def test_a_step_log_that_is_a_folder_is_refused_before_the_run(capsys, picture_dir, tmp_path):
    code, err = run(capsys, *train(picture_dir, tmp_path, "--log-jsonl", tmp_path))
    assert code == 2 and err.startswith("error: log_jsonl:") and "is a folder" in err, err
    code, err = run(capsys, "optimize-prompt", "--model", "demo", "--image", picture_dir / "picture0.png", "--output", tmp_path / "o",
                    "--log-jsonl", tmp_path)
    assert code == 2 and err.startswith("error: log_jsonl:"), err


def test_prompt_search_and_evaluation_refuse_non_finite_numbers(capsys, picture_dir, tmp_path):
    code, err = run(capsys, "optimize-prompt", "--model", "demo", "--image", picture_dir / "picture0.png", "--output", tmp_path / "o",
                    "--anchor", "a cat", "--anchor-weight", "nan")
    assert code == 2 and err.startswith("error: anchor_weight:"), err
    embedding = tmp_path / "e.safetensors"
    embedding.write_bytes(b"")
    code, err = run(capsys, "evaluate", "--model", "demo", "--embedding", embedding, "--images", picture_dir, "--prompt", "a <x>",
                    "--guidance=-inf")
    assert code == 2 and err.startswith("error: guidance:"), err


def _valid(cls, tmp_path):
    picture = tmp_path / "p.png"
    picture.write_bytes(b"")
    return {
        TrainSettings: lambda: TrainSettings(images=str(tmp_path), token="<x>", output_dir=str(tmp_path / "o")),
        PromptSettings: lambda: PromptSettings(images=[str(picture)], output_dir=str(tmp_path / "o")),
        EvalSettings: lambda: EvalSettings(embedding=str(picture), images=str(tmp_path), prompt="a <x>"),
        GenerateSettings: lambda: GenerateSettings(prompt="a cube", output=str(tmp_path / "o.png")),
    }[cls]()


@pytest.mark.parametrize("cls", [TrainSettings, PromptSettings, EvalSettings, GenerateSettings])
def test_no_number_anywhere_takes_nan_or_infinity(cls, tmp_path):
    base = _valid(cls, tmp_path)
    base.check()
    numbers = [(f.name, kind) for f, spec, kind in described_fields(cls) if kind.base in (int, float) and not kind.choices]
    assert numbers
    for name, kind in numbers:
        for bad in (math.nan, math.inf, -math.inf, 10**30):
            value = [bad] if kind.is_list else bad
            with pytest.raises(SettingsError, match=f"^{name}:"):
                dataclasses.replace(base, **{name: value}).check()


def test_every_setting_has_a_flag_and_a_description():
    parser = cli.build_parser()
    commands = {"train": TrainSettings, "optimize-prompt": PromptSettings, "evaluate": EvalSettings, "generate": GenerateSettings}
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for command, cls in commands.items():
        dests = {a.dest for a in subparsers[command]._actions}
        for f in dataclasses.fields(cls):
            if f.name == "extra":
                continue
            spec = f.metadata["spec"]
            assert spec.label and spec.help, f.name
            assert f.name in dests, f"{command} has no flag for {f.name}"
    # The two that had none: a train run takes them from the command line now.
    args = parser.parse_args(["train", "--images", "x", "--token", "<x>", "--output", "o", "--grad-clip", "0.5", "--crops", "3"])
    settings = cli._settings(TrainSettings, args)
    assert (settings.grad_clip, settings.crops, settings.images, settings.flip) == (0.5, 3, "x", True)
    assert cli._settings(TrainSettings, parser.parse_args(["train", "--images", "x", "--token", "t", "--output", "o", "--no-flip"])).flip is False


def test_method_defaults_come_from_the_registry_and_the_form_leaves_them_to_it():
    from tinv_gui.ui.options import option_defaults, option_fields, settings_from_form

    resolved = TrainSettings(images="x", token="<x>", method="textual-inversion").resolved()
    assert (resolved.steps, resolved.lr, resolved.grad_accum, resolved.scale_lr) == (3000, 5e-4, 4, True)
    assert resolved.total_steps == 3000
    two_phase = TrainSettings(images="x", token="<x>", method="quick-then-ti").resolved()
    assert two_phase.total_steps == METHODS["quick-then-ti"].defaults["quick_steps"] + METHODS["quick-then-ti"].defaults["steps"]
    names = [name for name, _, _ in option_fields()]
    assert "grad_clip" in names and "crops" in names and "token" not in names and "images" not in names
    assert option_defaults("quick")["steps"] == 100 and option_defaults("quick")["seed"] == 0
    # 0 where 0 is no value (lr, resolution) means "the default"; where it is one (weight decay), it is kept.
    assert settings_from_form("quick", {"lr": 0.0, "resolution": 0, "weight_decay": 0.0}) == {"weight_decay": 0.0}
    with pytest.raises(SettingsError, match="^seed:"):
        settings_from_form("quick", {"seed": math.nan})


def test_the_form_controls_carry_the_schema_ranges():
    import gradio as gr

    from tinv_gui.ui.options import option_component, option_defaults, option_fields

    defaults = option_defaults("quick")
    controls = {name: option_component(name, spec, kind, defaults[name]) for name, spec, kind in option_fields()}
    assert isinstance(controls["lr_schedule"], gr.Dropdown) and isinstance(controls["flip"], gr.Checkbox)
    assert controls["vectors"].maximum == 75 and controls["seed"].maximum == 2**32 - 1
    assert controls["resolution"].minimum == 0  # 0 stands for the model's own size
    assert controls["steps"].value == 100 and controls["steps"].label == "Steps"


def test_the_playground_refuses_a_seed_too_large(tmp_path):
    # generate streams its place in the queue, so it runs (and checks) as it is iterated
    import gradio as gr

    from tinv_gui.ui.app import TinvApp
    from tinv_gui.ui.workspace import Workspaces

    app = TinvApp(workspaces=Workspaces(tmp_path), hub=(False, "offline"))
    request = types.SimpleNamespace(session_hash="visitor")
    for seed, name in ((float(2**70), "seed"), (math.nan, "seed")):
        with pytest.raises(gr.Error, match=f"{name}:"):
            list(app.generate("demo", "none", "a cube", "", 2, 7.5, seed, "Model default", "Model default", 1, 1.0, False, request))
    with pytest.raises(gr.Error, match="guidance:"):
        list(app.generate("demo", "none", "a cube", "", 2, math.nan, 0, "Model default", "Model default", 1, 1.0, False, request))
