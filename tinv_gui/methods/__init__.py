"""The training methods, one registry entry each: its name, the function that runs it, its
published defaults, what it loads, and how the app presents it. Nothing else in tinv-gui
compares method names; to add a method, write its module here and add one `Method` below.

This module imports no model code: each runner imports its method's module when it runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Loaded:
    """What a job loaded for a method (only the parts its `loads` names are set)."""

    placement: object
    clips: list | None = None  # the CLIP model of each text encoder (SDXL has two)
    clip_images: list | None = None  # the pictures at CLIP's size
    pipe: object | None = None  # the whole diffusers pipeline
    images: list | None = None  # the pictures at the training resolution
    word_parts: dict | None = None  # with "clip": the start of the parts no CLIP learns (T5's), by text encoder


@dataclass(frozen=True)
class Preset:
    """How the app offers a method, in plain words."""

    label: str
    what: str  # what it does
    when: str  # when to pick it
    s_per_step_gpu: float  # rough speed for "how long on this device", until measured here
    s_per_step_cpu: float


@dataclass(frozen=True)
class Method:
    name: str
    run: Callable[[Loaded, object, object, object], object]  # (loaded, settings, reporter, writer)
    defaults: dict  # published defaults of the settings the method leaves None
    loads: frozenset  # "clip" (the CLIP models and pictures at CLIP's size), "pipeline" (the whole pipeline)
    preset: Preset
    step_settings: tuple[str, ...] = ("steps",)  # the settings whose sum is the run's steps
    resumable: bool = True  # continues from an embedding an earlier run saved


def _quick(loaded: Loaded, settings, reporter, writer):
    from .quick import train_quick

    return train_quick(loaded.clips, loaded.clip_images, settings, reporter, writer, word_parts=loaded.word_parts)


def _textual_inversion(loaded: Loaded, settings, reporter, writer):
    from .textual_inversion import train_textual_inversion

    return train_textual_inversion(loaded.pipe, loaded.placement, loaded.images, settings, reporter, writer)


def _quick_then_ti(loaded: Loaded, settings, reporter, writer):
    from .textual_inversion import train_quick_then_ti

    return train_quick_then_ti(
        loaded.clips, loaded.clip_images, loaded.pipe, loaded.placement, loaded.images, settings, reporter, writer, loaded.word_parts
    )


def _caption_init(loaded: Loaded, settings, reporter, writer):
    from .caption_init import train_caption_init

    return train_caption_init(loaded.pipe, loaded.placement, loaded.images, settings, reporter, writer)


QUICK = "quick"  # quick-then-ti runs it as its first phase

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            QUICK,
            _quick,
            # QuickEmbedding as Ethan Smith published it: AdamW lr 0.1, weight decay 0.01, linear
            # decay, gradient clip 1.0, batch 32, 100 steps.
            dict(steps=100, batch_size=32, lr=0.1, weight_decay=0.01, lr_schedule="linear", grad_clip=1.0, grad_accum=1, scale_lr=False),
            frozenset({"clip"}),
            Preset(
                "Quick",
                "QuickEmbedding: matches the new word to your pictures in CLIP's space only; no image is drawn while it learns. "
                "On SD 3.x and Flux.1 only the CLIP parts of the word learn; its T5 part stays at the starting word.",
                "A first try, or a slow computer. Captures colours, materials and the overall look; fine detail less well.",
                0.02,
                0.5,
            ),
            resumable=False,  # a run takes about a minute: it starts afresh
        ),
        Method(
            "quick-then-ti",
            _quick_then_ti,
            # The published QuickEmbedding recipe: 100 CLIP steps (QuickEmbedding's own defaults
            # above), then 50 diffusion steps at batch 4, lr 1.5e-3.
            dict(quick_steps=100, steps=50, batch_size=4, grad_accum=1, lr=1.5e-3, scale_lr=False, weight_decay=0.0, lr_schedule="constant"),
            frozenset({"clip", "pipeline"}),
            Preset(
                "Balanced",
                "QuickEmbedding first, then textual inversion continues from where it ended. On SD 3.x and Flux.1 "
                "QuickEmbedding warm-starts the CLIP parts, and the T5 part starts from the starting word.",
                "Most concepts, on a GPU: much of the quality of Thorough in a fraction of the time.",
                0.3,
                5.0,
            ),
            step_settings=("quick_steps", "steps"),
        ),
        Method(
            "textual-inversion",
            _textual_inversion,
            # Textual inversion as diffusers documents its example script (examples/textual_inversion):
            # batch 1 with 4 accumulated, lr 5e-4 scaled by the batch (so 2e-3), constant, 3000 steps,
            # AdamW weight decay 1e-2 (the script's default). About half an hour on a recent GPU.
            dict(steps=3000, batch_size=1, grad_accum=4, lr=5e-4, scale_lr=True, weight_decay=1e-2, lr_schedule="constant"),
            frozenset({"pipeline"}),
            Preset(
                "Thorough",
                "Textual inversion: learns the word through Stable Diffusion's own denoising, step by step.",
                "When Quick or Balanced miss the details and you have a GPU and some patience.",
                0.3,
                5.0,
            ),
        ),
        Method(
            "caption-init",
            _caption_init,
            # Caption-initialized inversion: every caption word starts where it means something
            # already, so ~100 diffusion steps at the diffusion phase settings of quick-then-ti suffice.
            dict(steps=100, batch_size=4, grad_accum=1, lr=1.5e-3, scale_lr=False, weight_decay=0.0, lr_schedule="constant"),
            frozenset({"pipeline"}),
            Preset(
                "From one picture",
                "Captions the picture, turns each word of the caption into its own vector, then refines them.",
                "You have a single picture (or two) of the concept.",
                0.3,
                5.0,
            ),
        ),
    )
}
METHOD_NAMES = tuple(METHODS)
DIFFUSION_METHODS = tuple(name for name, m in METHODS.items() if "pipeline" in m.loads)


def method_named(name: str) -> Method:
    """The registry entry of `name`; raises SettingsError naming the known methods."""
    if name not in METHODS:
        from ..schema import SettingsError

        raise SettingsError("method", f"{name!r} is not one of {', '.join(METHODS)}")
    return METHODS[name]


def method_with_label(label: str) -> Method:
    """The method the app offers under a preset label."""
    for method in METHODS.values():
        if method.preset.label == label:
            return method
    raise ValueError(f"unknown method preset {label!r}; choose one of {', '.join(m.preset.label for m in METHODS.values())}")
