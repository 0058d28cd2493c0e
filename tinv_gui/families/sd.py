"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, its last hidden states as conditioning,
epsilon or v prediction (the scheduler config says which)."""

from __future__ import annotations

import torch

from .base import Family


class StableDiffusion(Family):
    name = "sd"
    title = "Stable Diffusion"  # 1.x and 2.x
    pipeline_class = "StableDiffusionPipeline"
    index_prefixes = ("",)  # what no more specific family claims
    default_clips = {
        768: "openai/clip-vit-large-patch14",  # SD 1.x
        1024: "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",  # SD 2.x
    }
    demo_model = "demo"

    def pipeline_kwargs(self, dtype: torch.dtype) -> dict:
        return dict(dtype=dtype, safety_checker=None, requires_safety_checker=False)

    def encoder_output(self, index, text_encoder, ids, attention_mask):
        use_mask = bool(getattr(text_encoder.config, "use_attention_mask", False))
        return (text_encoder(ids, attention_mask=attention_mask if use_mask else None)[0],)

    def combine_outputs(self, outputs):
        ((hidden,),) = outputs
        return hidden, None
