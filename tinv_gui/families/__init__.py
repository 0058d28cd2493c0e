"""Model families: what differs between Stable Diffusion generations, owned by one class each.

A family knows its pipeline class and how to tell it from a folder's model_index.json or a
checkpoint's keys; its text encoders and tokenizers; how a prompt becomes the UNet's
conditioning (hidden states, pooled parts, extra ids such as SDXL's sizes); the keys of an
embedding file per text encoder; its training objective (the noise schedule's prediction
target, or flow matching for SD 3.x and Flux.1); its native resolution; and its offline demo
model. Methods and jobs ask the family instead of counting text encoders.

To add a family, write one module with a Family subclass and put it in FAMILIES below, before
the families it is more specific than.
"""

from __future__ import annotations

from .base import Family
from .flux import Flux
from .sd import StableDiffusion
from .sd3 import StableDiffusion3
from .sdxl import StableDiffusionXL

# The first that matches wins.
FAMILIES: tuple[Family, ...] = (StableDiffusion3(), Flux(), StableDiffusionXL(), StableDiffusion())


def family_for_index(class_name: str) -> Family:
    """The family of a diffusers pipeline folder, from model_index.json's `_class_name`."""
    return next(f for f in FAMILIES if f.matches_index(class_name))


def family_for_checkpoint(keys) -> Family:
    """The family of a single-file checkpoint, from its tensor names (nothing else is read)."""
    keys = list(keys)
    return next(f for f in FAMILIES if f.matches_checkpoint(keys))


def family_of(pipe) -> Family:
    """The family of a loaded pipeline."""
    return family_for_index(type(pipe).__name__)


__all__ = ["FAMILIES", "Family", "Flux", "StableDiffusion", "StableDiffusion3", "StableDiffusionXL", "family_for_checkpoint", "family_for_index", "family_of"]
