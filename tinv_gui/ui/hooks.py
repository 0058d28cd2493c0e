"""Where the app meets features built in other branches. ONE HOOK PER FEATURE, each marked
"HOOK (issue N)". A feature that is not installed is simply not offered; when its module lands,
wire the real call in here and nothing else in the UI changes.

- methods (issue 3): the presets below are offered when their method is in METHOD_DEFAULTS;
- auto-caption (issue 3's BLIP captioner): `auto_caption_available`, `auto_caption`;
- generation (issue 4's tinv_gui/generate.py): `generate_images`;
- prompt from an image (issue 4): `prompt_search_available`, `submit_prompt_search`;
- export formats and reading other tools' files (issue 6's tinv_gui/formats.py):
  `export_formats`, `read_embedding_file`. Evaluation figures (issue 6) arrive as
  `Finished.metrics` and are shown as they come; nothing to wire.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..embeddings import load_embedding, load_into_pipeline
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
    try:
        if embedding is not None:
            token, vectors = embedding
            width_expected = pipe.text_encoder.get_input_embeddings().weight.shape[1]
            if vectors.shape[1] != width_expected:
                raise ValueError(
                    f"this embedding has vectors of width {vectors.shape[1]}, but the model's text encoder has width "
                    f"{width_expected}: it was made for another family of models (768: SD 1.x, 1024: SD 2.x)"
                )
            load_into_pipeline(pipe, token, vectors, scale=strength)
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
        if embedding is not None:
            pipe.unload_textual_inversion()


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
# HOOK (issue 6): export formats and reading other tools' embedding files. Guessed interface:
#   tinv_gui.formats.FORMATS: names such as "a1111-pt", "a1111-safetensors", "kohya"
#   tinv_gui.formats.convert(src, format=name, output=path) -> path
#   tinv_gui.formats.read_embedding(path) -> (token, vectors [n, dim])
# Without it, downloads are the diffusers .safetensors, and files in diffusers' layout (plus the
# common single-tensor layouts below) can be loaded.
# ---------------------------------------------------------------------------------------------
FORMAT_SUFFIX = {"a1111-pt": ".pt", "a1111-safetensors": "-a1111.safetensors", "kohya": "-kohya.safetensors"}


def export_formats(embedding: Path) -> list[Path]:
    """The embedding file plus, when the formats module is installed, a copy in every format."""
    files = [embedding]
    if not _module_available("tinv_gui.formats"):
        return files
    from .. import formats

    for name in getattr(formats, "FORMATS", ()):
        if name == "diffusers":
            continue
        target = embedding.with_name(embedding.stem + FORMAT_SUFFIX.get(name, f"-{name}.safetensors"))
        files.append(Path(formats.convert(str(embedding), format=name, output=str(target))))
    return files


def read_embedding_file(path: str) -> tuple[str, torch.Tensor]:
    """(token, vectors) from an embedding file of this app, diffusers, AUTOMATIC1111 or kohya."""
    if _module_available("tinv_gui.formats"):
        from .. import formats

        return formats.read_embedding(path)
    path = Path(path)
    if path.suffix.lower() == ".pt":  # AUTOMATIC1111's .pt; weights_only never runs code from the file
        data = torch.load(path, map_location="cpu", weights_only=True)
        vectors = next(iter(data["string_to_param"].values()))
        return str(data.get("name") or path.stem), vectors.float().reshape(-1, vectors.shape[-1])
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path.name}: expected a .safetensors or .pt embedding file")
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    if "emb_params" in tensors:  # kohya and A1111's safetensors: the file name is the token
        vectors = tensors["emb_params"]
        return f"<{path.stem}>", vectors.float().reshape(-1, vectors.shape[-1])
    return load_embedding(path)
