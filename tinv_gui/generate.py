"""Generate pictures from what tinv-gui learned: embedding files (new tokens) and/or saved
prompt embeddings, through a diffusers pipeline from the ModelStore.

`generate` is the one function that draws: the CLI's `generate`, the Playground, the previews'
siblings in evaluation all call it. `GenerateSettings` (settings.py) is what a generation job
(jobs.py, Engine.generate) is asked to draw and where to save it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file

from .device import Placement
from .embeddings import embeddings_in_pipeline
from .families import Family, family_of
from .formats import read_embeddings
from .models import pipeline_text_widths
from .settings import SAMPLERS, GenerateSettings, parse_size  # noqa: F401 - described once in settings.py


def load_prompt_embeds(path: str | Path, family: Family, text_widths: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """The pipeline arguments saved in a prompt_embeds.safetensors file, checked against a model's
    family and text encoder widths (pipeline_text_widths): `prompt_embeds` and, when saved,
    `negative_prompt_embeds`; for a family with pooled parts (SDXL, SD 3.x, Flux.1:
    Family.pooled_in_prompt_embeds) also `pooled_prompt_embeds` (required) and
    `negative_pooled_prompt_embeds`."""
    name = Path(path).name
    try:
        tensors = load_file(str(path))
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same answer, naming it
        raise ValueError(f"{name} is not a prompt_embeds.safetensors file made by optimize-prompt ({error})") from None
    if "prompt_embeds" not in tensors:
        raise ValueError(f"{name} holds no 'prompt_embeds' tensor; make one with optimize-prompt")
    width = family.conditioning_width(text_widths)
    found = tensors["prompt_embeds"].shape[-1]
    if found != width:
        raise ValueError(
            f"{name} was made for text encoders of total width {found}, but this model's is {width}; use the model it was made with"
        )
    pooled = family.pooled_in_prompt_embeds
    if pooled and "pooled_prompt_embeds" not in tensors:
        raise ValueError(f"{name} holds no 'pooled_prompt_embeds', which {family.title} needs; make it again with optimize-prompt on this model")
    out = {"prompt_embeds": tensors["prompt_embeds"].reshape(1, -1, width)}
    if "negative_prompt_embeds" in tensors:
        out["negative_prompt_embeds"] = tensors["negative_prompt_embeds"].reshape(1, -1, width)
    if pooled:
        out["pooled_prompt_embeds"] = tensors["pooled_prompt_embeds"].reshape(1, -1)
        if "negative_prompt_embeds" in out:
            if "negative_pooled_prompt_embeds" not in tensors:
                raise ValueError(f"{name} holds a negative without its 'negative_pooled_prompt_embeds', which {family.title} needs")
            out["negative_pooled_prompt_embeds"] = tensors["negative_pooled_prompt_embeds"].reshape(1, -1)
    return out


def resolved_guidance(family: Family, guidance: float | None) -> float:
    """The guidance a picture is drawn with: the user's, else the family's own."""
    return family.default_guidance if guidance is None else float(guidance)


@torch.no_grad()
def generate(
    pipe,
    prompt: str | None = None,
    negative: str | None = None,
    embeddings=(),
    prompt_embeds: str | Path | None = None,
    steps: int = 25,
    guidance: float | None = None,
    seed: int = 0,
    size: tuple[int, int] | None = None,
    count: int = 1,
    placement: Placement | None = None,
    sampler: str = "Model default",
    strength: float = 1.0,
) -> list[Image.Image]:
    """Generate `count` pictures with `pipe` (a pipeline of any family in tinv_gui.families)
    and return them.

    `embeddings` are embedding files whose tokens the prompt may use, their vectors multiplied by
    `strength`; they are unloaded again afterwards, and the `sampler` (one of SAMPLERS) is used for
    this call only, so a cached pipeline stays as it was. `prompt_embeds` is a file from
    optimize-prompt, used instead of a text prompt; its saved negative is used unless `negative`
    is given. `guidance` None is the family's own (Family.default_guidance).
    """
    if (prompt is None) == (prompt_embeds is None):
        raise ValueError("give either a prompt or a prompt_embeds file, not both or neither")
    family = family_of(pipe)
    family.check_generation(negative, bool(SAMPLERS.get(sampler)))
    kwargs = dict(num_inference_steps=steps, guidance_scale=resolved_guidance(family, guidance), num_images_per_prompt=count, negative_prompt=negative)
    if prompt_embeds is not None:
        saved = load_prompt_embeds(prompt_embeds, family, pipeline_text_widths(pipe))
        if negative is not None:  # a typed negative replaces the saved one
            saved = {k: v for k, v in saved.items() if not k.startswith("negative_")}
        # SDXL hands the pooled tensors to the UNet as they are: give them the denoiser's dtype.
        kwargs.update({k: v.to(family.denoiser(pipe).dtype) for k, v in saved.items()})
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
            for prefix, text in (("", kwargs.get("prompt")), ("negative_", negative)):
                if text is not None:  # each text encoder's own prompt: a file may lack some encoders' parts
                    kwargs.update({argument: rewrite(text, i) for i, argument in enumerate(family_of(pipe).prompt_arguments(prefix))})
            with autocast:
                return pipe(generator=generator, **kwargs).images
    finally:
        pipe.scheduler = scheduler
