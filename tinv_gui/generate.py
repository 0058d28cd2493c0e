"""Generate pictures from what tinv-gui learned: embedding files (new tokens) and/or saved
prompt embeddings, through a diffusers pipeline from the ModelStore.

`generate` is the one function that draws: the CLI's `generate`, the Playground, the previews'
siblings in evaluation all call it. `GenerateSettings` is what a generation job (jobs.py,
Engine.generate) is asked to draw and where to save it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file

from .device import Placement
from .embeddings import embeddings_in_pipeline
from .formats import read_embeddings
from .model_families import FAMILY_TITLES, T5_ENCODER, pipeline_family
from .models import pipeline_text_widths
from .settings import SettingsError

# The samplers offered by name: diffusers scheduler classes, built from the pipeline's own
# scheduler config for one call. "Model default" keeps the pipeline's scheduler.
SAMPLERS = {
    "Model default": None,
    "DPM++ 2M": "DPMSolverMultistepScheduler",
    "Euler": "EulerDiscreteScheduler",
    "Euler ancestral": "EulerAncestralDiscreteScheduler",
    "DDIM": "DDIMScheduler",
    "UniPC": "UniPCMultistepScheduler",
}


@dataclass
class GenerateSettings:
    """What a generation job draws and where it saves it.

    The pictures go to `output` (a .png) when there is one; with `count` > 1 the others get -1,
    -2... in their names. With `compare`, the same seeds are drawn again without the embeddings,
    saved with -without in their names."""

    model: str = "demo"
    output: str = ""
    prompt: str | None = None
    prompt_embeds: str | None = None  # a file from optimize-prompt, instead of a prompt
    negative: str | None = None
    embeddings: list[str] = field(default_factory=list)  # embedding files whose tokens the prompt uses
    strength: float = 1.0  # multiplies the embeddings' vectors
    sampler: str = "Model default"  # one of SAMPLERS
    steps: int = 25
    guidance: float = 7.5
    seed: int = 0
    size: tuple[int, int] | None = None  # (width, height); None: the model's own
    count: int = 1
    compare: bool = False
    device: str = "auto"
    precision: str = "auto"

    def check(self) -> None:
        """Raise SettingsError naming the first value that cannot be used."""
        if (self.prompt is None) == (self.prompt_embeds is None):
            raise SettingsError("prompt", "give a prompt or a prompt_embeds file (one of them)")
        for name in ("steps", "count"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise SettingsError(name, f"must be a whole number of at least 1, not {value!r}")
        if self.sampler not in SAMPLERS:
            raise SettingsError("sampler", f"{self.sampler!r} is not one of {', '.join(SAMPLERS)}")
        if not str(self.output).lower().endswith(".png"):
            raise SettingsError("output", f"the pictures are PNG files: name one ending in .png, not {self.output!r}")

    def picture_paths(self, without: bool = False) -> list[Path]:
        """Where picture i of the run (with or without the embeddings) is saved."""
        output = Path(self.output)
        stem = output.stem + ("-without" if without else "")
        return [output.with_name(f"{stem}{f'-{i}' if i else ''}{output.suffix}") for i in range(self.count)]


def parse_size(text: str) -> tuple[int, int]:
    """'512x768' -> (512, 768), width first; both multiples of 8 (the VAE's scale)."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"size {text!r} is not WIDTHxHEIGHT, e.g. 512x512") from None
    if width < 8 or height < 8 or width % 8 or height % 8:
        raise ValueError(f"size {text!r}: width and height must be multiples of 8, at least 8")
    return width, height


def load_prompt_embeds(path: str | Path, text_widths: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """The pipeline arguments saved in a prompt_embeds.safetensors file, checked against a model's
    text encoder widths (pipeline_text_widths): `prompt_embeds` and, when saved,
    `negative_prompt_embeds`; for SDXL also `pooled_prompt_embeds` (required) and
    `negative_pooled_prompt_embeds`."""
    name = Path(path).name
    tensors = load_file(str(path))
    if "prompt_embeds" not in tensors:
        raise ValueError(f"{name} holds no 'prompt_embeds' tensor; make one with optimize-prompt")
    # SDXL conditions on both encoders' hidden states side by side.
    width = sum(text_widths)
    found = tensors["prompt_embeds"].shape[-1]
    if found != width:
        raise ValueError(
            f"{name} was made for text encoders of total width {found}, but this model's is {width}; use the model it was made with"
        )
    sdxl = len(text_widths) > 1
    if sdxl and "pooled_prompt_embeds" not in tensors:
        raise ValueError(f"{name} holds no 'pooled_prompt_embeds', which SDXL needs; make it again with optimize-prompt on this model")
    out = {"prompt_embeds": tensors["prompt_embeds"].reshape(1, -1, width)}
    if "negative_prompt_embeds" in tensors:
        out["negative_prompt_embeds"] = tensors["negative_prompt_embeds"].reshape(1, -1, width)
    if sdxl:
        out["pooled_prompt_embeds"] = tensors["pooled_prompt_embeds"].reshape(1, -1)
        if "negative_prompt_embeds" in out:
            if "negative_pooled_prompt_embeds" not in tensors:
                raise ValueError(f"{name} holds a negative without its 'negative_pooled_prompt_embeds', which SDXL needs")
            out["negative_pooled_prompt_embeds"] = tensors["negative_pooled_prompt_embeds"].reshape(1, -1)
    return out


@torch.no_grad()
def generate(
    pipe,
    prompt: str | None = None,
    negative: str | None = None,
    embeddings=(),
    prompt_embeds: str | Path | None = None,
    steps: int = 25,
    guidance: float = 7.5,
    seed: int = 0,
    size: tuple[int, int] | None = None,
    count: int = 1,
    placement: Placement | None = None,
    sampler: str = "Model default",
    strength: float = 1.0,
) -> list[Image.Image]:
    """Generate `count` pictures with `pipe` (a StableDiffusionPipeline or StableDiffusionXLPipeline)
    and return them.

    `embeddings` are embedding files whose tokens the prompt may use, their vectors multiplied by
    `strength`; they are unloaded again afterwards, and the `sampler` (one of SAMPLERS) is used for
    this call only, so a cached pipeline stays as it was. `prompt_embeds` is a file from
    optimize-prompt, used instead of a text prompt; its saved negative is used unless `negative`
    is given.
    """
    if (prompt is None) == (prompt_embeds is None):
        raise ValueError("give either a prompt or a prompt_embeds file, not both or neither")
    _refuse_what_the_family_lacks(pipe, negative, embeddings, prompt_embeds, sampler)
    kwargs = dict(num_inference_steps=steps, guidance_scale=guidance, num_images_per_prompt=count, negative_prompt=negative)
    if prompt_embeds is not None:
        saved = load_prompt_embeds(prompt_embeds, pipeline_text_widths(pipe))
        if negative is not None:  # a typed negative replaces the saved one
            saved = {k: v for k, v in saved.items() if not k.startswith("negative_")}
        # SDXL hands the pooled tensors to the UNet as they are: give them the UNet's dtype.
        kwargs.update({k: v.to(pipe.unet.dtype) for k, v in saved.items()})
    else:
        kwargs["prompt"] = prompt
    if size is not None:
        kwargs["width"], kwargs["height"] = size
    # A CPU generator gives the same pictures for a seed on every device.
    generator = torch.Generator("cpu").manual_seed(seed)
    autocast = placement.autocast() if placement is not None else contextlib.nullcontext()
    scheduler = pipe.scheduler
    try:
        if SAMPLERS.get(sampler):
            import diffusers

            pipe.scheduler = getattr(diffusers, SAMPLERS[sampler]).from_config(scheduler.config)
        # Embeddings are called by their names in the prompts; diffusers' SDXL two-file output is one.
        with embeddings_in_pipeline(pipe, read_embeddings(embeddings), scale=strength) as rewrite:
            kwargs.update(prompt=rewrite(kwargs.get("prompt")), negative_prompt=rewrite(kwargs["negative_prompt"]))
            with autocast:
                return pipe(generator=generator, **kwargs).images
    finally:
        pipe.scheduler = scheduler


def _refuse_what_the_family_lacks(pipe, negative, embeddings, prompt_embeds, sampler) -> None:
    """SD 3.x and Flux.1 draw with a plain prompt for now: embeddings and prompt files for them
    are not built yet; they sample with their own flow-matching scheduler, which the SD samplers
    cannot replace; Flux.1 has no negative prompt (dev's guidance is distilled into the model)."""
    family = pipeline_family(pipe)
    if family not in T5_ENCODER:
        return
    title = FAMILY_TITLES[family]
    if embeddings or prompt_embeds is not None:
        raise ValueError(f"embeddings and prompt files for {title} are not supported yet: generate with a plain prompt")
    if SAMPLERS.get(sampler):
        raise ValueError(f"{title} samples with its own flow-matching scheduler: choose the sampler 'Model default'")
    if family == "flux" and negative:
        raise ValueError(
            "Flux.1 has no negative prompt: its guidance is distilled into the model (dev) or absent (schnell); "
            "leave the negative empty and set the guidance (about 3.5 for dev)"
        )
