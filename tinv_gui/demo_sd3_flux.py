"""The offline demo models of the flow-matching families: "demo-sd3" (Stable Diffusion 3 / 3.5)
and "demo-flux" (Flux.1 dev), tiny random-weight pipelines of the real architectures.

- demo-sd3 is a diffusers StableDiffusion3Pipeline: two CLIP text towers with projections (a
  CLIP-L-like and a bigG-like one, of different widths so that mixing them up fails loudly), a
  T5 encoder (T5 v1.1's gated-GELU blocks, as T5-XXL), an MMDiT (SD3Transformer2DModel with SD
  3.5's RMS-normed queries and keys, and one dual-attention block as 3.5 Medium), a 16-channel VAE
  and the flow-matching Euler scheduler.
- demo-flux is a diffusers FluxPipeline: CLIP-L (its pooled output), T5, a FluxTransformer2DModel
  with a guidance embedding (as Flux.1 dev), the 16-channel VAE and the flow-matching scheduler
  with Flux's resolution-dependent shift.

Each CLIP text encoder equals the text tower of a CLIP model (with its image tower) written
beside the pipeline, as for demo-sdxl, so the CLIP-space methods have their image towers.

The T5 tokenizer needs no download and no sentencepiece: `build_t5_tokenizer` makes a Unigram
tokenizer (T5's kind, with its special tokens and layout) whose pieces are the ASCII pieces of
CLIP's BPE vocabulary shipped in assets/, scored by their merge rank. It is built, not trained:
the same every time, and instant (the `tokenizers` library's Unigram trainer takes ~25 s here and
its result depends on the number of threads).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .demo_model import (
    DEMO_VERSION,
    IMAGE_SIZE,
    TOKENIZER_DIR,
    _build_clip,
    _cached,
    _text_config,
    _tiny_vae,
    load_clip_tokenizer,
)

SD3_DEMO_NAME = "demo-sd3"
FLUX_DEMO_NAME = "demo-flux"
# Widths of the text encoders, in the pipeline's order: CLIP-L, bigG, T5 (real: 768, 1280, 4096).
# T5 is wider than both CLIPs side by side, as in SD3, whose CLIP states are zero-padded to T5's width.
SD3_TEXT_WIDTHS = (32, 64, 128)
FLUX_TEXT_WIDTHS = (32, 128)  # CLIP-L, T5
T5_MAX_LENGTH = 512  # T5's model_max_length; SD3 reads 256 tokens of a prompt, Flux.1 dev 512
T5_EXTRA_IDS = 100  # T5's sentinel tokens <extra_id_0..99>, last in its vocabulary
T5_PIECES = 4000  # T5-XXL has 32000
LATENT_CHANNELS = 16  # SD3's and Flux's VAE


# ----------------------------------------------------------------------------- T5 tokenizer
def _unigram_pieces(count: int = T5_PIECES) -> list[tuple[str, float]]:
    """Sentencepiece-style pieces from CLIP's BPE vocabulary, in merge order: a word-final CLIP
    token "cat</w>" becomes the word-initial piece "▁cat", any other "at" stays a continuation
    piece; the printable ASCII characters come first (CLIP's byte tokens), so every ASCII text is
    covered. Scores are Zipf log-probabilities of the rank."""
    clip_vocab = json.loads((TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8"))
    pieces = {"▁": None}
    for token, _ in sorted(clip_vocab.items(), key=lambda item: item[1]):
        text = token.removesuffix("</w>")
        if not text or not all("!" <= c <= "~" for c in text):  # CLIP's byte stand-ins for spaces and non-ASCII
            continue
        pieces.setdefault("▁" + text if token.endswith("</w>") else text, None)
        if len(pieces) == count:
            break
    norm = math.log(sum(1 / (rank + 1) for rank in range(len(pieces))))
    return [(piece, -math.log(rank + 1) - norm) for rank, piece in enumerate(pieces)]


def build_t5_tokenizer(model_max_length: int = T5_MAX_LENGTH):
    """A T5TokenizerFast with T5's layout (<pad> 0, </s> 1, <unk> 2, the pieces, then
    <extra_id_99> ... <extra_id_0>), normalization, Metaspace splitting and the </s> it appends,
    from the CLIP vocabulary shipped in assets/ (see the module's docstring)."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from transformers import T5TokenizerFast

    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    sentinels = [(f"<extra_id_{i}>", 0.0) for i in reversed(range(T5_EXTRA_IDS))]
    backend = Tokenizer(models.Unigram(specials + _unigram_pieces() + sentinels, unk_id=2, byte_fallback=False))
    backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(
        tokenizer_object=backend,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_ids=T5_EXTRA_IDS,
        model_max_length=model_max_length,
    )


def _tiny_t5(tokenizer, width: int, seed: int):
    """A T5 v1.1 encoder (gated GELU, no tied embeddings, as T5-XXL), two blocks wide `width`.
    Its embedding has more rows than the tokenizer has tokens, rounded up to a multiple of 128, as
    T5-XXL's 32128 rows for 32100 tokens."""
    from transformers import T5Config, T5EncoderModel

    heads = 8
    config = T5Config(
        vocab_size=math.ceil(len(tokenizer) / 128) * 128,
        d_model=width,
        d_kv=width // heads,
        d_ff=2 * width,
        num_layers=2,
        num_heads=heads,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


# ----------------------------------------------------------------------------- shared parts
def _flow_vae(scaling_factor: float, shift_factor: float):
    """SD3's and Flux's VAE: 16 latent channels, no quantization convolutions, a shift and scale
    of the latents (the real values of each family)."""
    return _tiny_vae(scaling_factor, LATENT_CHANNELS, shift_factor=shift_factor, use_quant_conv=False, use_post_quant_conv=False)


def _with_projection(clip):
    """The text tower and projection of a CLIP model, as a CLIPTextModelWithProjection."""
    from transformers import CLIPTextModelWithProjection

    text_encoder = CLIPTextModelWithProjection(clip.config.text_config).eval()
    text_encoder.load_state_dict({k: v for k, v in clip.state_dict().items() if k.startswith(("text_model.", "text_projection."))})
    return text_encoder


def _write(out_dir: Path, pipe, clips: dict) -> Path:
    """Write `pipe` to `out_dir/sd` (a diffusers folder) and each CLIP model with its processor
    to `out_dir/<name>` ({name: (CLIPModel, processor)})."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out_dir / "sd")
    for name, (clip, processor) in clips.items():
        clip.save_pretrained(out_dir / name)
        processor.save_pretrained(out_dir / name)
    return out_dir


# ----------------------------------------------------------------------------- SD 3 / 3.5
def build_demo_sd3(seed: int = 0):
    """(StableDiffusion3Pipeline, {"clip_l": (CLIPModel, processor), "clip_g": ...})."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    width_l, width_g, width_t5 = SD3_TEXT_WIDTHS
    tokenizer = load_clip_tokenizer()
    tokenizer_2 = load_clip_tokenizer(pad_token="!")  # OpenCLIP's padding, as SD3's second tokenizer
    clip_l = _build_clip(tokenizer, seed, _text_config(width_l))
    # bigG keeps the old CLIP config (end-of-text id 2, GELU), as SD3's second encoder ships it.
    clip_g = _build_clip(tokenizer_2, seed + 2, _text_config(width_g, hidden_act="gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1))
    tokenizer_3 = build_t5_tokenizer()
    text_encoder_3 = _tiny_t5(tokenizer_3, width_t5, seed + 3)
    torch.manual_seed(seed + 4)
    transformer = SD3Transformer2DModel(
        sample_size=IMAGE_SIZE // 2,  # latents are half the picture's size in the tiny VAE (real: 1/8)
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=width_t5,  # the T5 width, to which the CLIP states are padded
        caption_projection_dim=32,
        pooled_projection_dim=width_l + width_g,  # both CLIPs' pooled projections side by side
        pos_embed_max_size=64,  # pictures up to 256 px
        qk_norm="rms_norm",  # SD 3.5
        dual_attention_layers=(0,),  # SD 3.5 Medium's MMDiT-X
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_flow_vae(scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=_with_projection(clip_l[0]),
        tokenizer=tokenizer,
        text_encoder_2=_with_projection(clip_g[0]),
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    return pipe, {"clip_l": clip_l, "clip_g": clip_g}


def write_demo_sd3(out_dir: str | Path, seed: int = 0) -> Path:
    """Build the SD3-shaped demo model and write `out_dir/sd` (diffusers folder) and the CLIP
    models its two CLIP text encoders come from, `out_dir/clip_l` and `out_dir/clip_g`."""
    pipe, clips = build_demo_sd3(seed)
    return _write(Path(out_dir), pipe, clips)


def demo_sd3_dir() -> Path:
    """The cached SD3 demo model folder, built on first use (safe to race, as demo_model_dir)."""
    return _cached(f"{SD3_DEMO_NAME}-v{DEMO_VERSION}", write_demo_sd3, ("sd/model_index.json", "clip_l/config.json", "clip_g/config.json"))


# ----------------------------------------------------------------------------- Flux.1
def build_demo_flux(seed: int = 0):
    """(FluxPipeline, {"clip_l": (CLIPModel, processor)})."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextModel

    width_l, width_t5 = FLUX_TEXT_WIDTHS
    tokenizer = load_clip_tokenizer()
    clip_l = _build_clip(tokenizer, seed, _text_config(width_l))
    text_encoder = CLIPTextModel(clip_l[0].config.text_config).eval()
    text_encoder.load_state_dict(clip_l[0].text_model.state_dict())
    tokenizer_2 = build_t5_tokenizer()
    text_encoder_2 = _tiny_t5(tokenizer_2, width_t5, seed + 3)
    torch.manual_seed(seed + 4)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,  # latents packed in 2x2 patches
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=width_t5,
        pooled_projection_dim=width_l,  # CLIP-L's pooled output
        guidance_embeds=True,  # Flux.1 dev's distilled guidance (schnell has none)
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim, as (16, 56, 56) to 128
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=_flow_vae(scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    return pipe, {"clip_l": clip_l}


def write_demo_flux(out_dir: str | Path, seed: int = 0) -> Path:
    """Build the Flux-shaped demo model and write `out_dir/sd` (diffusers folder) and the CLIP
    model its CLIP text encoder comes from, `out_dir/clip_l`."""
    pipe, clips = build_demo_flux(seed)
    return _write(Path(out_dir), pipe, clips)


def fit_demo_flux(pipe) -> None:
    """Make the loaded demo-flux draw at the demo models' IMAGE_SIZE by default, which is also its
    native resolution (Flux.native_resolution): FluxPipeline's default is a constant 128 latents a
    side (1024 px at the real VAE's 8x), 256 px at the demo VAE's 2x. It is not saved with the
    pipeline, so ModelStore applies it to "demo-flux" on every load."""
    pipe.default_sample_size = IMAGE_SIZE // pipe.vae_scale_factor


def demo_flux_dir() -> Path:
    """The cached Flux demo model folder, built on first use (safe to race, as demo_model_dir)."""
    return _cached(f"{FLUX_DEMO_NAME}-v{DEMO_VERSION}", write_demo_flux, ("sd/model_index.json", "clip_l/config.json"))
