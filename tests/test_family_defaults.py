"""What a model family's user gets when they choose nothing: the guidance a picture is drawn at
(the family's pipeline's own default), and the Playground showing it."""

from pathlib import Path

from tinv_gui.families import FAMILIES
from tinv_gui.settings import GUIDANCE_HELP

README = " ".join((Path(__file__).resolve().parent.parent / "README.md").read_text().split())  # its words, lines joined
# The diffusers pipelines' own defaults (their __call__'s guidance_scale), as the help and README name each family.
OWN_GUIDANCE = {"sd": ("SD 1.x/2.x", 7.5), "sdxl": ("SDXL", 5.0), "sd3": ("SD 3.x", 7.0), "flux": ("Flux.1", 3.5)}


def test_each_family_draws_at_its_pipelines_own_guidance_and_the_help_and_readme_say_which():
    """Flux.1-dev's guidance embedding was distilled at 3.5 and SD 3.x's pipeline defaults to 7:
    SD 1.x's 7.5 for every family drew Flux.1 at twice its guidance."""
    for family in FAMILIES:
        label, value = OWN_GUIDANCE[family.name]
        assert family.default_guidance == value, family.name
        assert f"{label} {value:g}" in GUIDANCE_HELP, label
        assert f"{value:g} for {label}" in README, label


def test_the_playgrounds_guidance_follows_the_models_own_when_the_model_changes(store, tmp_path):
    from tinv_gui.engine import Engine
    from tinv_gui.ui.app import TinvApp
    from tinv_gui.ui.workspace import Workspaces

    app = TinvApp(engine=Engine(store), workspaces=Workspaces(tmp_path), hub=(False, "offline"))
    page = app.build()
    model, guidance = app.components["model"], app.components["guidance"]
    assert guidance.value == store.family(model.value).default_guidance  # the default model's (SD 1.x)
    (follow,) = [d for d in page.fns.values() if guidance in d.outputs and (model._id, "change") in map(tuple, d.targets)]
    for name, (_, value) in (("demo-flux", OWN_GUIDANCE["flux"]), ("demo-sd3", OWN_GUIDANCE["sd3"]), ("demo", OWN_GUIDANCE["sd"])):
        assert follow.fn(name)["value"] == value, name
    assert follow.fn(str(tmp_path / "no-such-model")) is not None  # left as it is, no error (generating names the problem)


def test_the_buckets_help_names_the_grid_the_buckets_keep_to():
    """--buckets said "sides multiples of 64", untrue below 512 px (an eighth of the resolution)
    and for SD 3.x and Flux.1 (16 px, their transformers' 2x2 patches on the 8x VAE)."""
    from functools import reduce
    from math import gcd

    from tinv_gui.data import bucket_sizes
    from tinv_gui.schema import field_spec
    from tinv_gui.settings import TrainSettings

    help_text = field_spec(TrainSettings, "aspect_buckets")[0].help
    assert "on a 64 px grid; below 512 px, an eighth of the resolution rounded down to 8 px, or to 16 px for SD 3.x and Flux.1" in help_text

    def grid(resolution: int, multiple: int) -> int:  # what every bucket's sides are multiples of (the resolution's square aside)
        return reduce(gcd, [side for size in bucket_sizes(resolution, multiple) if size != (resolution, resolution) for side in size])

    assert grid(512, 8) == grid(1024, 8) == grid(1024, 16) == 64
    assert (grid(448, 8), grid(448, 16), grid(200, 8), grid(64, 8), grid(64, 16)) == (56, 48, 24, 8, 16)
