"""Flux.1 dev / schnell: CLIP-L for the pooled vector and T5-XXL for the sequence, a transformer
over 2x2-packed latents, flow matching, and (dev) guidance distilled into a guidance embedding
instead of a negative prompt.

What is here is what loading and drawing need; the conditioning, objective and embedding parts
for training come with issue 14's training (`trainable` is False until then, and the jobs refuse).
"""

from __future__ import annotations

from .sd3 import TransformerFamily, refuse_beyond_a_plain_prompt


class Flux(TransformerFamily):
    name = "flux"
    title = "Flux.1"
    pipeline_class = "FluxPipeline"
    index_prefixes = ("Flux",)
    # The first double-stream block's tensor, by which diffusers' single-file loader knows Flux.1 too.
    checkpoint_tensor = "double_blocks.0.img_attn.norm.key_norm.scale"
    text_encoder_attributes = ("text_encoder", "text_encoder_2")
    tokenizer_attributes = ("tokenizer", "tokenizer_2")
    t5_encoder = 1
    embedding_keys = ("clip_l", "t5")  # OneTrainer's layout for Flux.1
    default_clips = {768: "openai/clip-vit-large-patch14"}
    demo_model = "demo-flux"

    def native_resolution(self, pipe) -> int:
        return int(pipe.default_sample_size) * int(pipe.vae_scale_factor)  # the pipeline's default, 1024 px

    def check_generation(self, negative, custom_sampler, with_prompt_file):
        refuse_beyond_a_plain_prompt(self.title, custom_sampler, with_prompt_file)
        if negative:
            raise ValueError(
                "Flux.1 has no negative prompt: its guidance is distilled into the model (dev) or absent (schnell); "
                "leave the negative empty and set the guidance (about 3.5 for dev)"
            )
