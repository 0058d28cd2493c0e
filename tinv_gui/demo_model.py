"""The offline demo model: a tiny random-weight Stable Diffusion 1.x-shaped pipeline and a
matching CLIP model, built from configs, so everything runs (and is tested) without the Hub.

Its CLIP model's text tower has exactly the weights of the pipeline's text encoder, as real SD 1.x
pipelines share OpenAI's CLIP ViT-L/14 text tower. The tokenizer is CLIP's real BPE tokenizer,
shipped in assets/clip_tokenizer. Weights are random: pictures it generates are noise; the point
is that every code path, shape and file format is the real one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
TOKENIZER_DIR = ASSETS_DIR / "clip_tokenizer"
DEMO_NAMES = ("demo", "demo-vpred")
# Bump when the demo's shapes change, so stale caches are rebuilt rather than reused.
DEMO_VERSION = 1
TEXT_WIDTH = 64
IMAGE_SIZE = 64


def cache_home() -> Path:
    """Where tinv-gui keeps built demo models (TINV_GUI_HOME, else ~/.cache/tinv-gui)."""
    return Path(os.environ.get("TINV_GUI_HOME") or Path.home() / ".cache" / "tinv-gui")


def load_clip_tokenizer():
    """CLIP's real BPE tokenizer from the shipped vocab.json and merges.txt."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(
        str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"), model_max_length=77
    )


def _text_config():
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=TEXT_WIDTH,
        intermediate_size=4 * TEXT_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=TEXT_WIDTH,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def _build_clip(tokenizer, seed: int):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPVisionConfig

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=TEXT_WIDTH,
        intermediate_size=4 * TEXT_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=16,
        projection_dim=TEXT_WIDTH,
        hidden_act="quick_gelu",
    )
    config = CLIPConfig(text_config=_text_config().to_dict(), vision_config=vision.to_dict(), projection_dim=TEXT_WIDTH)
    clip = CLIPModel(config).eval()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return clip, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def _build_pipeline(clip, tokenizer, prediction_type: str, seed: int):
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(_text_config()).eval()
    text_encoder.load_state_dict(clip.text_model.state_dict())
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
    )
    # Stable Diffusion 1.x's own noise schedule.
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
        prediction_type=prediction_type,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,  # only the safety checker uses it, and the demo has none
        requires_safety_checker=False,
    )


def write_demo_model(out_dir: str | Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Build the demo model and write `out_dir/sd` (diffusers folder) and `out_dir/clip` (CLIP folder)."""
    out_dir = Path(out_dir)
    tokenizer = load_clip_tokenizer()
    clip, processor = _build_clip(tokenizer, seed)
    pipe = _build_pipeline(clip, tokenizer, prediction_type, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out_dir / "sd")
    clip.save_pretrained(out_dir / "clip")
    processor.save_pretrained(out_dir / "clip")
    return out_dir


def demo_model_dir(name: str = "demo") -> Path:
    """The cached demo model folder for `name` ("demo", or "demo-vpred" for v-prediction),
    built on first use."""
    if name not in DEMO_NAMES:
        raise ValueError(f"unknown demo model {name!r}; choose one of {', '.join(DEMO_NAMES)}")
    prediction_type = "v_prediction" if name == "demo-vpred" else "epsilon"
    return _cached(f"{name}-v{DEMO_VERSION}", lambda staging: write_demo_model(staging, prediction_type=prediction_type), ("sd/model_index.json", "clip/config.json"))


def _cached(folder: str, write, marks: tuple[str, ...]) -> Path:
    """`cache_home()/folder`, written by `write(staging_dir)` unless its `marks` files exist.
    Concurrent first uses are safe: each builds aside and renames into place."""
    target = cache_home() / folder
    if all((target / mark).exists() for mark in marks):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not all((target / mark).exists() for mark in marks):
                raise  # someone else's half-built folder is not ours to trust
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


DEMO_CAPTIONER = "demo"
CAPTIONER_VOCAB_WORDS = 2000


def _captioner_vocab() -> dict[str, int]:
    """A small WordPiece vocabulary (BERT's special tokens, BLIP's [DEC], then the most frequent
    whole words of CLIP's shipped vocabulary), so the demo captioner needs no download."""
    import json

    clip_vocab = json.loads((TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8"))
    words = [w[: -len("</w>")] for w, _ in sorted(clip_vocab.items(), key=lambda item: item[1]) if w.endswith("</w>")]
    words = [w for w in words if w.isascii() and w.isalpha() and len(w) > 2][:CAPTIONER_VOCAB_WORDS]
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    return {token: i for i, token in enumerate(specials + words)}


def write_demo_captioner(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny random-weight BLIP captioner (BlipForConditionalGeneration) with its processor.
    Its captions are random words; the point is that the real captioning code path runs."""
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
        BlipTextConfig,
        BlipVisionConfig,
    )

    vocab = _captioner_vocab()
    tokenizer = BertTokenizer(vocab=vocab, bos_token="[DEC]", model_max_length=64)
    text = BlipTextConfig(
        vocab_size=len(vocab),
        hidden_size=TEXT_WIDTH,
        encoder_hidden_size=TEXT_WIDTH,
        intermediate_size=2 * TEXT_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        bos_token_id=vocab["[DEC]"],
        sep_token_id=vocab["[SEP]"],
        eos_token_id=vocab["[SEP]"],
        pad_token_id=vocab["[PAD]"],
    )
    vision = BlipVisionConfig(
        hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH, num_hidden_layers=2, num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=16
    )
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text.to_dict(), vision_config=vision.to_dict())).eval()
    processor = BlipProcessor(BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}), tokenizer)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def demo_captioner_dir() -> Path:
    """The cached demo captioner folder, built on first use."""
    return _cached(f"captioner-v{DEMO_VERSION}", write_demo_captioner, ("config.json", "model.safetensors"))
