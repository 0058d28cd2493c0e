"""Stable Diffusion 3 / 3.5: three text encoders (OpenAI CLIP ViT-L and OpenCLIP ViT-bigG with
their projections, and T5-XXL), an MMDiT transformer and flow matching.

What is here is what loading and drawing need; the conditioning, objective and embedding parts
for training come with issue 14's training (`trainable` is False until then, and the jobs refuse).
"""

from __future__ import annotations

from .base import Family, has_tensor


def refuse_beyond_a_plain_prompt(title: str, custom_sampler: bool, with_prompt_file: bool) -> None:
    """SD 3.x and Flux.1 draw from a prompt (with embeddings or without) with their own
    flow-matching scheduler for now."""
    if with_prompt_file:
        raise ValueError(f"prompt files for {title} are not supported yet: generate from a prompt (embeddings work)")
    if custom_sampler:
        raise ValueError(f"{title} samples with its own flow-matching scheduler: choose the sampler 'Model default'")


class TransformerFamily(Family):
    """What SD 3.x and Flux.1 share until their training comes: a transformer as the denoiser,
    told in a single file by one tensor of its first block, drawing from plain prompts only."""

    checkpoint_tensor = ""
    trainable = False

    def matches_checkpoint(self, keys):
        return has_tensor(keys, self.checkpoint_tensor)

    def denoiser(self, pipe):
        return pipe.transformer

    def check_generation(self, negative, custom_sampler, with_prompt_file):
        refuse_beyond_a_plain_prompt(self.title, custom_sampler, with_prompt_file)


class StableDiffusion3(TransformerFamily):
    name = "sd3"
    title = "Stable Diffusion 3"  # 3 and 3.5
    pipeline_class = "StableDiffusion3Pipeline"
    index_prefixes = ("StableDiffusion3",)
    # The first MMDiT block's tensor, by which diffusers' single-file loader knows SD 3.x too.
    checkpoint_tensor = "joint_blocks.0.context_block.adaLN_modulation.1.bias"
    text_encoder_attributes = ("text_encoder", "text_encoder_2", "text_encoder_3")
    tokenizer_attributes = ("tokenizer", "tokenizer_2", "tokenizer_3")
    t5_encoder = 2
    embedding_keys = ("clip_l", "clip_g", "t5")  # OneTrainer's layout for SD 3.x
    default_clips = {
        768: "openai/clip-vit-large-patch14",
        1280: "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k",
    }
    demo_model = "demo-sd3"

    def native_resolution(self, pipe) -> int:
        return int(pipe.transformer.config.sample_size) * int(pipe.vae_scale_factor)
