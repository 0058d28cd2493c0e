"""The offline demo model: a tiny random-weight Stable Diffusion 1.x-shaped pipeline and a
matching CLIP model, built from configs, so everything runs (and is tested) without the Hub.

Its CLIP model's text tower has exactly the weights of the pipeline's text encoder, as real SD 1.x
pipelines share OpenAI's CLIP ViT-L/14 text tower. The tokenizer is CLIP's real BPE tokenizer,
shipped in assets/clip_tokenizer. Weights are random: pictures it generates are noise; the point
is that every code path, shape and file format is the real one.

The SDXL demo ("demo-sdxl") has SDXL's shape: two text encoders (a CLIP text model, and a
second CLIP's text tower with its projection, whose pooled output conditions the UNet with the
size and crop numbers), each equal to the text tower of a CLIP model shipped beside it.
"""

from __future__ import annotations

import contextlib
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


def load_clip_tokenizer(**kwargs):
    """CLIP's real BPE tokenizer from the shipped vocab.json and merges.txt."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(
        str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"), model_max_length=77, **kwargs
    )


def _text_config(width: int = TEXT_WIDTH, **overrides):
    from transformers import CLIPTextConfig

    values = dict(
        vocab_size=49408,
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=width,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextConfig(**{**values, **overrides})


def _build_clip(tokenizer, seed: int, text_config=None):
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPVisionConfig,
    )

    text_config = text_config or _text_config()
    width = text_config.hidden_size
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=16,
        projection_dim=width,
        hidden_act=text_config.hidden_act,
    )
    config = CLIPConfig(text_config=text_config.to_dict(), vision_config=vision.to_dict(), projection_dim=width)
    clip = CLIPModel(config).eval()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return clip, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def _tiny_vae(scaling_factor: float = 0.18215, latent_channels: int = 4, **family_options):
    """A two-block VAE; `family_options` are what a family's VAE sets besides (SD3/Flux: shift, no quant convs)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=latent_channels,
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
        scaling_factor=scaling_factor,
        **family_options,
    )


def _tiny_unet(**variant):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64), norm_num_groups=16, **variant
    )


# The noise schedule Stable Diffusion 1.x, 2.x and XL were all trained with.
SD_NOISE_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1)


def _build_pipeline(clip, tokenizer, prediction_type: str, seed: int):
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(_text_config()).eval()
    text_encoder.load_state_dict(clip.text_model.state_dict())
    unet = _tiny_unet(
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8,
    )
    vae = _tiny_vae()
    scheduler = PNDMScheduler(
        **SD_NOISE_SCHEDULE,
        skip_prk_steps=True,
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


# The SDXL demo's two text encoders: narrow, and of different widths, so that mixing up their
# vectors fails loudly rather than passing by chance.
SDXL_DEMO_NAME = "demo-sdxl"
SDXL_TEXT_WIDTHS = (32, 64)
SDXL_TIME_EMBED_WIDTH = 8  # SDXL's is 256


def _build_sdxl_pipeline(clip_l, clip_g, tokenizer, tokenizer_2, seed: int):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(clip_l.config.text_config).eval()
    text_encoder.load_state_dict(clip_l.text_model.state_dict())
    # Text tower and projection of the second CLIP, as SDXL's second encoder is OpenCLIP bigG's.
    text_encoder_2 = CLIPTextModelWithProjection(clip_g.config.text_config).eval()
    text_encoder_2.load_state_dict({k: v for k, v in clip_g.state_dict().items() if k.startswith(("text_model.", "text_projection."))})
    width_l, width_g = SDXL_TEXT_WIDTHS
    unet = _tiny_unet(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=width_l + width_g,  # the two encoders' hidden states side by side
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        # SDXL's extra conditioning: the pooled text embedding and six size/crop numbers.
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED_WIDTH,
        projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED_WIDTH + clip_g.config.projection_dim,
    )
    scheduler = EulerDiscreteScheduler(**SD_NOISE_SCHEDULE, timestep_spacing="leading", prediction_type="epsilon")  # SDXL's sampler
    return StableDiffusionXLPipeline(
        vae=_tiny_vae(scaling_factor=0.13025),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def write_demo_sdxl(out_dir: str | Path, seed: int = 0) -> Path:
    """Build the SDXL-shaped demo model and write `out_dir/sd` (diffusers folder) and the CLIP
    models its two text encoders come from, `out_dir/clip_l` and `out_dir/clip_g`."""
    out_dir = Path(out_dir)
    tokenizer = load_clip_tokenizer()
    # SDXL's second tokenizer is the same BPE, padding with "!" as OpenCLIP does.
    tokenizer_2 = load_clip_tokenizer(pad_token="!")
    width_l, width_g = SDXL_TEXT_WIDTHS
    clip_l, processor_l = _build_clip(tokenizer, seed, _text_config(width_l))
    # SDXL's second encoder keeps the old CLIP config (end-of-text id 2, GELU), whose pooling
    # models.py corrects; the demo has it too, so that correction is exercised.
    config_g = _text_config(width_g, hidden_act="gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1)
    clip_g, processor_g = _build_clip(tokenizer_2, seed + 2, config_g)
    pipe = _build_sdxl_pipeline(clip_l, clip_g, tokenizer, tokenizer_2, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out_dir / "sd")
    for name, clip, processor in (("clip_l", clip_l, processor_l), ("clip_g", clip_g, processor_g)):
        clip.save_pretrained(out_dir / name)
        processor.save_pretrained(out_dir / name)
    return out_dir


def demo_sdxl_dir() -> Path:
    """The cached SDXL demo model folder, built on first use (safe to race, as demo_model_dir)."""
    return _cached(f"{SDXL_DEMO_NAME}-v{DEMO_VERSION}", write_demo_sdxl, ("sd/model_index.json", "clip_l/config.json", "clip_g/config.json"))


def demo_model_dir(name: str = "demo") -> Path:
    """The cached demo model folder for `name` ("demo", or "demo-vpred" for v-prediction),
    built on first use."""
    if name not in DEMO_NAMES:
        raise ValueError(f"unknown demo model {name!r}; choose one of {', '.join(DEMO_NAMES)}")
    prediction_type = "v_prediction" if name == "demo-vpred" else "epsilon"
    return _cached(f"{name}-v{DEMO_VERSION}", lambda staging: write_demo_model(staging, prediction_type=prediction_type), ("sd/model_index.json", "clip/config.json"))


def _cached(folder: str, write, marks: tuple[str, ...]) -> Path:
    """`cache_home()/folder`, written by `write(staging_dir)` unless its `marks` files exist.
    Concurrent first uses (the processes of a multi-process run) are safe: one process builds it
    under a lock file while the others wait, and it is built aside and renamed into place, so a
    folder with its marks is always whole."""
    target = cache_home() / folder
    if all((target / mark).exists() for mark in marks):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(target.parent / f".{folder}.lock"):
        if all((target / mark).exists() for mark in marks):
            return target  # built by another process while this one waited
        shutil.rmtree(target, ignore_errors=True)  # a half-built folder from a crash (not ours to trust)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            write(staging)
            os.rename(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """Hold an exclusive lock on `lock_path` (POSIX flock; elsewhere no lock: the rename still keeps folders whole)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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
