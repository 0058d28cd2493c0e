"""Stable Diffusion 3 / 3.5: three text encoders (OpenAI CLIP ViT-L and OpenCLIP ViT-bigG with
their projections, and T5-XXL), an MMDiT transformer and flow matching.

The conditioning is StableDiffusion3Pipeline.encode_prompt's: both CLIPs' penultimate hidden
states side by side, zero-padded to T5's width, followed by T5's 256 token states; the pooled
vector is both CLIPs' projected pooled outputs side by side.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Family, has_tensor


def refuse_other_samplers(title: str, custom_sampler: bool) -> None:
    """SD 3.x and Flux.1 draw with their own flow-matching scheduler for now."""
    if custom_sampler:
        raise ValueError(f"{title} samples with its own flow-matching scheduler: choose the sampler 'Model default'")


class TransformerFamily(Family):
    """What SD 3.x and Flux.1 share: a transformer as the denoiser, told in a single file by one
    tensor of its first block, CLIP text encoders beside a T5, flow matching, drawing with the
    model's own scheduler."""

    checkpoint_tensor = ""  # the tensor (of its first block) only its single-file checkpoints hold
    partial_embeddings = True  # OneTrainer's files for these families hold only the parts of the text encoders it loaded
    size_multiple = 16  # the VAE's 8 times the transformer's 2x2 patches
    usual_resolution = 1024  # SD 3.x's and Flux.1's native size

    def matches_checkpoint(self, keys):
        return has_tensor(keys, self.checkpoint_tensor)

    def denoiser(self, pipe):
        return pipe.transformer

    def prepare(self, pipe) -> None:
        """Each CLIP's pooled output (which these families condition on) is taken at the first
        end-of-text token, as SDXL's second encoder's (see StableDiffusionXL.prepare): their
        shipped configs say end-of-text id 2, under which transformers pools at the largest id,
        a new token's once a learned one is in the prompt."""
        for index, (text_encoder, tokenizer) in enumerate(zip(self.text_encoders(pipe), self.tokenizers(pipe))):
            if index != self.t5_encoder:
                text_encoder.config.eos_token_id = tokenizer.eos_token_id
                getattr(text_encoder, "text_model", text_encoder).eos_token_id = tokenizer.eos_token_id

    def objective(self, scheduler_config, device):
        from ..objectives import FlowMatching

        return FlowMatching(scheduler_config, device)

    def recomputed_layers(self, denoiser) -> list:
        return []  # a transformer's activations are alike in every block: checkpoint all of them, or none

    def pipeline_conditioning(self, hidden, pooled, prefix: str = "") -> dict:
        return {f"{prefix}prompt_embeds": hidden, f"{prefix}pooled_prompt_embeds": pooled}

    @property
    def pooled_in_prompt_embeds(self) -> bool:
        return True

    def conditioning_width(self, text_widths):
        return text_widths[self.t5_encoder]  # the CLIP states are zero-padded to T5's width (SD 3.x) or pooled (Flux.1)

    def check_generation(self, negative, custom_sampler):
        refuse_other_samplers(self.title, custom_sampler)


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

    def prompt_lengths(self, pipe):
        return [77, 77, 256]  # the pipeline's max_sequence_length for T5

    def encoder_output(self, index, text_encoder, ids, attention_mask):
        if index == self.t5_encoder:
            return (text_encoder(ids)[0],)
        out = text_encoder(ids, output_hidden_states=True)
        return out.hidden_states[-2], out.text_embeds

    def combine_outputs(self, outputs):
        (hidden_l, pooled_l), (hidden_g, pooled_g), (hidden_t5,) = outputs
        clip = torch.cat([hidden_l, hidden_g], dim=-1)
        clip = F.pad(clip, (0, hidden_t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, hidden_t5.to(clip.dtype)], dim=-2), torch.cat([pooled_l, pooled_g], dim=-1)

    def predict(self, denoiser, noisy, timesteps, hidden, pooled, size_ids):
        dtype = denoiser.dtype
        return denoiser(
            hidden_states=noisy.to(dtype), timestep=timesteps, encoder_hidden_states=hidden.to(dtype),
            pooled_projections=pooled.to(dtype), return_dict=False,
        )[0]
