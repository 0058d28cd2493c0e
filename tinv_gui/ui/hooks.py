"""Where the app meets features built in other branches. ONE HOOK PER FEATURE, each marked
"HOOK (issue N)". A feature that is not installed is simply not offered; when its module lands,
wire the real call in here and nothing else in the UI changes.

- methods (issue 3): the presets below are offered when their method is in METHOD_DEFAULTS;
- auto-caption (issue 3's BLIP captioner): `auto_caption_available`, `auto_caption`;
- generation (issue 4's tinv_gui/generate.py): `generate_images`;
- prompt from an image (issue 4): `prompt_search_available`, `submit_prompt_search`;
- issue 6 (merged) is wired: downloads in every format (`export_formats`), other tools' files
  in the Playground (embeddings.load_embedding), the figures of tinv_gui/evaluate.py
  (TinvApp.measure).
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..embeddings import load_into_pipeline, unload_from_pipeline
from ..settings import METHOD_DEFAULTS


def _module_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False


# ---------------------------------------------------------------------------------------------
# HOOK (issue 3): training methods, as presets in plain words.
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preset:
    label: str
    method: str
    what: str  # what it does
    when: str  # when to pick it
    s_per_step_gpu: float  # rough speed for "how long on this device", replaced by measurements
    s_per_step_cpu: float
    uses_captions: bool = False


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
        uses_captions=True,
    ),
)


def available_presets() -> list[Preset]:
    """The presets whose method this build has; a method not built yet is not offered."""
    return [p for p in PRESETS if p.method in METHOD_DEFAULTS]


def preset_by_label(label: str) -> Preset:
    for preset in available_presets():
        if preset.label == label:
            return preset
    raise ValueError(f"unknown method preset {label!r}; choose one of {', '.join(p.label for p in available_presets())}")


# ---------------------------------------------------------------------------------------------
# HOOK (issue 3): auto-captioning with BLIP. Guessed interface:
#   tinv_gui.captioning.caption_images(paths: list[str], model: str) -> list[str]
# ---------------------------------------------------------------------------------------------
def auto_caption_available() -> bool:
    return _module_available("tinv_gui.captioning")


def auto_caption(paths: list[str], model: str) -> list[str]:
    from .. import captioning  # noqa: PLC0415 - only present once issue 3 lands

    return captioning.caption_images(paths, model=model)


# ---------------------------------------------------------------------------------------------
# HOOK (issue 4): generation. Until tinv_gui/generate.py lands, this small function calls the
# warm pipeline from the ModelStore directly, adding the embedding for the call and removing it
# afterwards. It runs on the engine's thread, so it never overlaps a training job.
# ---------------------------------------------------------------------------------------------
SAMPLERS = {
    "Model default": None,
    "DPM++ 2M": "DPMSolverMultistepScheduler",
    "Euler": "EulerDiscreteScheduler",
    "Euler ancestral": "EulerAncestralDiscreteScheduler",
    "DDIM": "DDIMScheduler",
    "UniPC": "UniPCMultistepScheduler",
}


def generate_images(
    pipe,
    prompt: str,
    negative: str = "",
    steps: int = 25,
    guidance: float = 7.5,
    seed: int = 0,
    sampler: str = "Model default",
    size: tuple[int, int] | None = None,
    count: int = 1,
    embedding: tuple[str, torch.Tensor] | None = None,
    strength: float = 1.0,
):
    """`count` pictures for `prompt`; picture i uses seed + i, so runs with and without the
    embedding are comparable. `embedding` is (token, vectors [n, dim]), scaled by `strength`."""
    import diffusers

    width, height = size or (None, None)
    original_scheduler = pipe.scheduler
    if SAMPLERS.get(sampler):
        pipe.scheduler = getattr(diffusers, SAMPLERS[sampler]).from_config(original_scheduler.config)
    names = []
    try:
        if embedding is not None:  # refuses vectors made for another text width, naming both
            names = load_into_pipeline(pipe, embedding[0], embedding[1], scale=strength)
        generators = [torch.Generator("cpu").manual_seed(int(seed) + i) for i in range(count)]
        result = pipe(
            [prompt] * count,
            negative_prompt=[negative] * count if negative else None,
            num_inference_steps=int(steps),
            guidance_scale=float(guidance),
            generator=generators,
            width=width,
            height=height,
        )
        return result.images
    finally:
        pipe.scheduler = original_scheduler
        if names:
            unload_from_pipeline(pipe, names)  # the pipeline stays cached: leave it as it was


# ---------------------------------------------------------------------------------------------
# HOOK (issue 4): prompt from an image. Guessed interface: the engine gets
#   Engine.optimize_prompt(settings) -> Job, with settings from
#   tinv_gui.settings.PromptSettings(images=[path], model=..., hard=bool, steps=int|None, output_dir=...)
# and the job's Finished.outputs holding "prompt" (a .txt, readable mode) or "prompt_embeds".
# Its Progress.loss is the spherical distance to the picture.
# ---------------------------------------------------------------------------------------------
def prompt_search_available() -> bool:
    from .. import settings
    from ..engine import Engine

    return hasattr(settings, "PromptSettings") and hasattr(Engine, "optimize_prompt")


def submit_prompt_search(engine, image: str, model: str, hard: bool, steps: int | None, output_dir: str):
    from ..settings import PromptSettings  # only present once issue 4 lands

    return engine.optimize_prompt(PromptSettings(images=[image], model=model, hard=hard, steps=steps, output_dir=output_dir))


def similarity_from_loss(loss: float) -> float:
    """Cosine similarity from the spherical distance θ²/2 the CLIP-space methods minimize."""
    return math.cos(math.sqrt(max(2.0 * loss, 0.0)))


# ---------------------------------------------------------------------------------------------
# Issue 6 (wired): every export format for download, and files of every tool for the Playground.
# ---------------------------------------------------------------------------------------------
DOWNLOAD_ORDER = ("a1111-pt", "a1111-safetensors", "diffusers-bin", "kohya")


def export_formats(embedding: Path) -> list[tuple[Path, str]]:
    """The run's embedding and a copy in every format, each with the tools it is for. Files
    that would share a name in the download list get the format in theirs."""
    from .. import formats

    written = formats.export_all(embedding)
    files = [(embedding, formats.FORMATS["diffusers"])]
    names = {embedding.name}
    for fmt in DOWNLOAD_ORDER:
        path = Path(written[fmt])
        if path.name in names:  # A1111's and kohya's .safetensors take the same name
            path = path.rename(path.with_name(f"{path.stem}-{fmt}{path.suffix}"))
        names.add(path.name)
        files.append((path, formats.FORMATS.get(fmt, "diffusers' older .bin layout")))
    return files
