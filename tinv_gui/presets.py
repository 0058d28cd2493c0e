"""The training methods as the app offers them: a preset per method, in plain words.

A preset names a method of settings.METHOD_DEFAULTS and says what it does, when to pick it, and
how long a step takes roughly (until the app has measured it on this machine).
"""

from __future__ import annotations

from dataclasses import dataclass

from .settings import METHOD_DEFAULTS


@dataclass(frozen=True)
class Preset:
    """A training method as the page offers it: a name and plain words on what it does and when to pick it."""

    label: str
    method: str
    what: str  # what it does
    when: str  # when to pick it
    s_per_step_gpu: float  # rough speed for "how long on this device", replaced by measurements
    s_per_step_cpu: float


PRESETS = (
    Preset(
        "Quick",
        "quick",
        "QuickEmbedding: matches the new word to your pictures in CLIP's space only; no image is drawn while it learns.",
        "A first try, or a slow computer. Captures colours, materials and the overall look; fine detail less well.",
        0.02,
        0.5,
    ),
    Preset(
        "Balanced",
        "quick-then-ti",
        "QuickEmbedding first, then textual inversion continues from where it ended.",
        "Most concepts, on a GPU: much of the quality of Thorough in a fraction of the time.",
        0.3,
        5.0,
    ),
    Preset(
        "Thorough",
        "textual-inversion",
        "Textual inversion: learns the word through Stable Diffusion's own denoising, step by step.",
        "When Quick or Balanced miss the details and you have a GPU and some patience.",
        0.3,
        5.0,
    ),
    Preset(
        "From one picture",
        "caption-init",
        "Captions the picture, turns each word of the caption into its own vector, then refines them.",
        "You have a single picture (or two) of the concept.",
        0.3,
        5.0,
    ),
)


def available_presets() -> list[Preset]:
    """The presets whose method this build has; a method not built yet is not offered."""
    return [p for p in PRESETS if p.method in METHOD_DEFAULTS]


def preset_by_label(label: str) -> Preset:
    """The preset the page shows as `label`; ValueError naming the choices otherwise."""
    for preset in available_presets():
        if preset.label == label:
            return preset
    raise ValueError(f"unknown method preset {label!r}; choose one of {', '.join(p.label for p in available_presets())}")
