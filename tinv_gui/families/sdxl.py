"""Stable Diffusion XL: two text encoders (OpenAI CLIP ViT-L and OpenCLIP ViT-bigG), their
penultimate hidden states side by side, the second's pooled projection, and each picture's size
conditioning (original size, crop corner, target size)."""

from __future__ import annotations

import torch

from .base import Family


class StableDiffusionXL(Family):
    name = "sdxl"
    title = "Stable Diffusion XL"
    pipeline_class = "StableDiffusionXLPipeline"
    index_prefixes = ("StableDiffusionXL",)
    checkpoint_key_prefix = "conditioner.embedders.1."  # its second text encoder, OpenCLIP bigG
    text_encoder_attributes = ("text_encoder", "text_encoder_2")
    tokenizer_attributes = ("tokenizer", "tokenizer_2")
    embedding_keys = ("clip_l", "clip_g")
    default_clips = {
        768: "openai/clip-vit-large-patch14",
        1280: "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k",
    }
    demo_model = "demo-sdxl"
    usual_resolution = 1024

    def pipeline_kwargs(self, dtype: torch.dtype) -> dict:
        return dict(dtype=dtype, add_watermarker=False)  # it has no safety checker; a watermark is the user's choice

    def prepare(self, pipe) -> None:
        """The second text encoder ships an old config (end-of-text id 2) under which transformers
        pools at the largest token id, which is a new token's once a learned one is in the prompt.
        Pool at the first end-of-text token instead, as SDXL itself does: the same for every
        prompt of known words, and right for prompts holding new tokens."""
        eos = pipe.tokenizer_2.eos_token_id
        pipe.text_encoder_2.config.eos_token_id = eos
        getattr(pipe.text_encoder_2, "text_model", pipe.text_encoder_2).eos_token_id = eos

    def vae_needs_upcast(self, vae) -> bool:
        # Its VAE overflows in float16: the pipeline runs it in float32 (force_upcast), and so does tinv-gui.
        return vae.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))

    def encoder_output(self, index, text_encoder, ids, attention_mask):
        out = text_encoder(ids, output_hidden_states=True)
        return (out.hidden_states[-2], out.text_embeds) if index == 1 else (out.hidden_states[-2],)

    def combine_outputs(self, outputs):
        return torch.cat([out[0] for out in outputs], dim=-1), outputs[-1][1]

    def size_conditioning(self, images, size: int) -> torch.Tensor:
        """[pictures, 6] as its training computes them: the original (height, width), the crop's
        (top, left) corner, the target (height, width): the picture's square or bucket."""
        return torch.tensor(
            [[*(i.original_size or (size, size)), *i.crop_top_left, i.image.height, i.image.width] for i in images], dtype=torch.float32
        )

    def predict(self, denoiser, noisy, timesteps, hidden, pooled, size_ids):
        dtype = denoiser.dtype
        extra = {"text_embeds": pooled.to(dtype), "time_ids": size_ids.to(dtype)}
        return denoiser(noisy.to(dtype), timesteps, hidden.to(dtype), added_cond_kwargs=extra).sample

    def pipeline_conditioning(self, hidden, pooled, prefix: str = "") -> dict:
        return {f"{prefix}prompt_embeds": hidden, f"{prefix}pooled_prompt_embeds": pooled}

    @property
    def pooled_in_prompt_embeds(self) -> bool:
        return True
