"""Caption-initialized inversion: describe the picture in words, give every word of the caption
its own new vector starting at that word's embedding, then fine-tune them all with the diffusion
loss. The start already means roughly the right thing, so ~100 steps are enough.

The caption comes from the user (`--caption`, or their edit in the app) or from BLIP
(Salesforce/blip-image-captioning-base); demo models get a tiny random BLIP built offline.
The token the user chose stands for all the vectors: in prompts, and in the saved file
({token: tensor[n, dim]}, which diffusers loads as token, token_1, ...).
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from ..data import TEMPLATES
from ..demo_model import DEMO_CAPTIONER, DEMO_NAMES, SDXL_DEMO_NAME, demo_captioner_dir
from ..demo_sd3_flux import FLUX_DEMO_NAME, SD3_DEMO_NAME
from ..embeddings import tokenize_words
from ..models import ModelLoadError, ModelSource, _explain
from ..schema import SettingsError
from ..settings import MAX_PROMPT_LENGTH
from .textual_inversion import read_resume, starting_vectors, train_diffusion

DEFAULT_CAPTIONER = "Salesforce/blip-image-captioning-base"


def captioner_for(model: str, caption_model: str | None) -> str:
    """The captioning model to use: the one named, else the demo captioner for demo models, else BLIP."""
    if caption_model:
        return caption_model
    return DEMO_CAPTIONER if model in (*DEMO_NAMES, SDXL_DEMO_NAME, SD3_DEMO_NAME, FLUX_DEMO_NAME) else DEFAULT_CAPTIONER


@torch.no_grad()
def caption_picture(image: Image.Image, captioner: str, device: torch.device) -> str:
    """A short description of the picture by a BLIP captioning model (loaded for this call only)."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    location = str(demo_captioner_dir()) if captioner == DEMO_CAPTIONER else captioner
    try:
        processor = BlipProcessor.from_pretrained(location)
        model = BlipForConditionalGeneration.from_pretrained(location).to(device).eval()
    except Exception as error:  # noqa: BLE001 - turned into a message the user can act on
        kind = "folder" if captioner == DEMO_CAPTIONER or Path(captioner).exists() else "hub"
        raise _explain(ModelSource(captioner, kind, location), "the captioning model", error) from error
    inputs = processor(images=image.convert("RGB"), return_tensors="pt").to(device)
    ids = model.generate(**inputs, max_new_tokens=20)  # BLIP captions are short; 20 is its own default length
    return processor.decode(ids[0], skip_special_tokens=True).strip()


def caption_room(tokenizer, style: str) -> int:
    """How many caption tokens fit in the longest training prompt of the style."""
    longest = max(len(tokenize_words(tokenizer, t.replace("{}", " "))) for t in TEMPLATES[style])
    return MAX_PROMPT_LENGTH - longest


def train_caption_init(pipe, placement, images, settings, reporter, writer) -> torch.Tensor:
    """Caption the first picture (unless --caption gave one), start one vector per caption token
    from that token's embedding, and train them with the diffusion loss (or continue --resume)."""
    if settings.resume:
        resumed = read_resume(settings.resume, pipe)
        return train_diffusion(pipe, placement, images, settings, reporter, writer, resumed.vectors, "ti", resumed)
    caption = settings.caption
    if caption is None:
        captioner = captioner_for(settings.model, settings.caption_model)
        reporter.log(f"Captioning {images[0].path} with {captioner}")
        try:
            caption = caption_picture(images[0].image, captioner, placement.device)
        except ModelLoadError as error:
            raise ModelLoadError(f"{error} Or type the caption yourself (--caption).") from error
    tokenizer = pipe.tokenizer
    count = len(tokenize_words(tokenizer, caption))
    if count == 0:
        raise SettingsError("caption", f"the caption {caption!r} has no words the model knows; type one with --caption")
    room = caption_room(tokenizer, settings.style)
    if count > room:
        raise SettingsError("caption", f"the caption {caption!r} is {count} tokens long; at most {room} fit in a prompt, so shorten it")
    reporter.log(f"Caption: {caption!r} -> {count} vectors, one per token")
    writer.metadata.update(init=caption, caption=caption)
    vectors = starting_vectors(pipe, caption, count, settings.seed)
    return train_diffusion(pipe, placement, images, settings, reporter, writer, vectors, "ti")
