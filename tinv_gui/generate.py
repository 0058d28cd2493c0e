"""Generate pictures from what tinv-gui learned: embedding files (new tokens) and/or saved
prompt embeddings, through a diffusers pipeline from the ModelStore."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file

from .device import Placement
from .embeddings import load_into_pipeline, unload_from_pipeline
from .formats import check_fits, read_embedding
from .models import pipeline_text_widths


def parse_size(text: str) -> tuple[int, int]:
    """'512x768' -> (512, 768), width first; both multiples of 8 (the VAE's scale)."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"size {text!r} is not WIDTHxHEIGHT, e.g. 512x512") from None
    if width < 8 or height < 8 or width % 8 or height % 8:
        raise ValueError(f"size {text!r}: width and height must be multiples of 8, at least 8")
    return width, height


def load_prompt_embeds(path: str | Path, text_width: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prompt_embeds, negative_prompt_embeds or None) from a prompt_embeds.safetensors file."""
    tensors = load_file(str(path))
    if "prompt_embeds" not in tensors:
        raise ValueError(f"{Path(path).name} holds no 'prompt_embeds' tensor; make one with optimize-prompt")
    embeds = tensors["prompt_embeds"]
    if embeds.shape[-1] != text_width:
        raise ValueError(
            f"{Path(path).name} was made for a text encoder of width {embeds.shape[-1]}, but this model's is "
            f"{text_width}; use the model it was made with"
        )
    embeds = embeds.reshape(1, -1, text_width)
    negative = tensors.get("negative_prompt_embeds")
    return embeds, None if negative is None else negative.reshape(1, -1, text_width)


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
) -> list[Image.Image]:
    """Generate `count` pictures with `pipe` (a StableDiffusionPipeline or StableDiffusionXLPipeline)
    and return them.

    `embeddings` are embedding files whose tokens the prompt may use; they are unloaded again
    afterwards, so a cached pipeline stays clean. `prompt_embeds` is a file from optimize-prompt,
    used instead of a text prompt; its saved negative is used unless `negative` is given.
    """
    if (prompt is None) == (prompt_embeds is None):
        raise ValueError("give either a prompt or a prompt_embeds file, not both or neither")
    kwargs = dict(num_inference_steps=steps, guidance_scale=guidance, num_images_per_prompt=count, negative_prompt=negative)
    if prompt_embeds is not None:
        if len(pipeline_text_widths(pipe)) > 1:
            raise ValueError("prompt embeddings files are made for SD 1.x/2.x pipelines; with SDXL, use a text prompt")
        embeds, saved_negative = load_prompt_embeds(prompt_embeds, pipe.text_encoder.config.hidden_size)
        kwargs["prompt_embeds"] = embeds
        if negative is None:
            kwargs["negative_prompt_embeds"] = saved_negative
    else:
        kwargs["prompt"] = prompt
    if size is not None:
        kwargs["width"], kwargs["height"] = size
    # A CPU generator gives the same pictures for a seed on every device.
    generator = torch.Generator("cpu").manual_seed(seed)
    autocast = placement.autocast() if placement is not None else contextlib.nullcontext()
    added: list[str] = []
    try:
        for path in embeddings:
            embedding = read_embedding(path)
            check_fits(embedding, pipeline_text_widths(pipe), Path(path).name)
            added += load_into_pipeline(pipe, embedding.token, embedding.vectors, vectors_g=embedding.vectors_g)
        with autocast:
            return pipe(generator=generator, **kwargs).images
    finally:
        if added:  # the pipeline stays cached for other jobs: leave it clean
            unload_from_pipeline(pipe, added)
