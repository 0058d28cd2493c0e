"""Random-weight models with the shapes of the real ones, built from configs and cached on disk,
so the benchmarks measure real-sized work without downloading anything.

- Stable Diffusion 1.5: UNet (860M parameters), CLIP ViT-L/14 text tower (width 768, 12 layers,
  12 heads), the SD VAE (channels 128/256/512/512, two layers per block); CLIP's real tokenizer.
- CLIP ViT-L/14 with both towers (for QuickEmbedding), its text tower shaped as above.

Cached under $TINV_GUI_HOME/bench (about 6 GB), so a second benchmark run starts at once.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tinv_gui.demo_model import _cached, load_clip_tokenizer  # noqa: E402

VERSION = 1


def text_config():
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        projection_dim=768,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def write_sd15(out_dir: Path) -> None:
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=CLIPTextModel(text_config()), tokenizer=load_clip_tokenizer(), unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir)


def write_clip_vit_l14(out_dir: Path) -> None:
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPVisionConfig,
    )

    torch.manual_seed(1)
    vision = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
    )
    config = CLIPConfig(text_config=text_config().to_dict(), vision_config=vision.to_dict(), projection_dim=768)
    CLIPModel(config).save_pretrained(out_dir)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}),
        tokenizer=load_clip_tokenizer(),
    )
    processor.save_pretrained(out_dir)


def sd15_dir() -> Path:
    """The SD 1.5-shaped pipeline folder, built on first use."""
    return _cached(f"bench/sd15-shaped-v{VERSION}", write_sd15, ("model_index.json", "unet/config.json"))


def clip_vit_l14_dir() -> Path:
    """The CLIP ViT-L/14-shaped model folder, built on first use."""
    return _cached(f"bench/clip-vit-l14-shaped-v{VERSION}", write_clip_vit_l14, ("config.json", "model.safetensors"))
