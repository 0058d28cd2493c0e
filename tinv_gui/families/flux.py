"""Flux.1 dev / schnell: CLIP-L for the pooled vector and T5-XXL for the sequence, a transformer
over 2x2-packed latents, flow matching, and (dev) guidance distilled into a guidance embedding
instead of a negative prompt.

The conditioning is FluxPipeline.encode_prompt's: CLIP-L's pooled output and T5's 512 token
states. Training feeds the transformer as diffusers' train_dreambooth_flux script does: latents
packed into 2x2 patches with their position ids, the timestep divided by 1000, and (dev) the
guidance value 3.5.
"""

from __future__ import annotations

import torch

from .sd3 import TransformerFamily, refuse_other_samplers


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
    training_guidance = 3.5  # diffusers' Flux training scripts' --guidance_scale, for the guidance-distilled dev

    def native_resolution(self, pipe) -> int:
        return int(pipe.default_sample_size) * int(pipe.vae_scale_factor)  # the pipeline's default, 1024 px

    def check_generation(self, negative, custom_sampler):
        refuse_other_samplers(self.title, custom_sampler)
        if negative:
            raise ValueError(
                "Flux.1 runs without a negative prompt here: its guidance is distilled into the model (dev) or absent (schnell), "
                "and a negative prompt would need true classifier-free guidance (diffusers' true_cfg_scale), which doubles each "
                "step and tinv-gui does not offer; leave the negative empty and set the guidance (about 3.5 for dev)"
            )

    def prompt_lengths(self, pipe):
        return [77, 512]  # the pipeline's max_sequence_length for T5

    def encoder_output(self, index, text_encoder, ids, attention_mask):
        if index == self.t5_encoder:
            return (text_encoder(ids)[0],)
        return (text_encoder(ids).pooler_output,)

    def combine_outputs(self, outputs):
        (pooled,), (hidden,) = outputs
        return hidden, pooled

    def predict(self, denoiser, noisy, timesteps, hidden, pooled, size_ids):
        from diffusers import FluxPipeline

        dtype = denoiser.dtype
        batch, channels, height, width = noisy.shape
        packed = FluxPipeline._pack_latents(noisy.to(dtype), batch, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, noisy.device, dtype)
        text_ids = torch.zeros(hidden.shape[1], 3, device=noisy.device, dtype=dtype)
        guidance = torch.full((batch,), self.training_guidance, device=noisy.device) if denoiser.config.guidance_embeds else None
        packed_prediction = denoiser(
            hidden_states=packed, timestep=timesteps / 1000, guidance=guidance, pooled_projections=pooled.to(dtype),
            encoder_hidden_states=hidden.to(dtype), txt_ids=text_ids, img_ids=image_ids, return_dict=False,
        )[0]
        # vae_scale_factor 1: the sizes given are the latents' own
        return FluxPipeline._unpack_latents(packed_prediction, height, width, 1)
