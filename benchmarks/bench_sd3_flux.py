"""What a textual-inversion step costs on SD 3.5 Medium, per choice of the text encoders that learn.

    python benchmarks/bench_sd3_flux.py [--resolution 1024] [--steps 2]

Runs our own step (methods.textual_inversion.DiffusionLoss with the family's conditioning and
flow matching, then the backward pass to the token's vectors) on a StableDiffusion3Pipeline with
SD 3.5 Medium's shapes and random weights, built here from configs (nothing is downloaded):
CLIP ViT-L/14 and OpenCLIP bigG/14 text towers with their projections (whole), T5-XXL (width
4096, 64 heads, gated-GELU feed-forward of 10240) and the MMDiT (width 1536, 24 heads, RMS-normed
queries and keys, dual attention), at the native 1024 px (64x64 latents, 4096 image tokens, 77 +
256 text tokens), batch 1, fp32 (this CPU computes bf16 5-17x slower, emulated).

The MMDiT and T5-XXL both have 24 blocks, and a step's work and memory grow with them block by
block. The whole 24-block models (8 B parameters, 32 GB in fp32) do not fit this 24 GiB machine
beside the others' work, so each configuration is run with 1 and with 2 blocks of each, and the
24-block figures are extrapolated: time(24) = time(1) + 23 x (time(2) - time(1)), and the same
for peak memory. Each configuration runs in its own process under the big-memory lock; the
figures are the CPU seconds (wall seconds swing with the other work of a shared machine) and the
peak resident memory of the timed steps after one warm-up step.

Choices (setting train_encoders): all (CLIP-L, bigG and T5 run forward and backward every step),
clip (T5's states computed once, before the steps), t5 (the CLIPs' states computed once).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import RssSampler, StepClock, print_table, report, run_child  # noqa: E402

CHOICES = ("all", "clip", "t5")
FULL_BLOCKS = 24  # SD 3.5 Medium's MMDiT layers; T5-XXL's encoder layers


def build_sd35_medium(blocks: int):
    """A StableDiffusion3Pipeline with SD 3.5 Medium's shapes, `blocks` MMDiT and T5 blocks, random weights."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    from tinv_gui.demo_model import load_clip_tokenizer
    from tinv_gui.demo_sd3_flux import build_t5_tokenizer

    torch.manual_seed(0)
    clip_l = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            projection_dim=768, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    clip_g = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                            projection_dim=1280, hidden_act="gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    t5 = T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=blocks, num_heads=64,
                  feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, is_encoder_decoder=False, use_cache=False)
    transformer = SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, num_layers=blocks, attention_head_dim=64, num_attention_heads=24,
        joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=384, dual_attention_layers=tuple(range(blocks)), qk_norm="rms_norm",
    )
    vae = AutoencoderKL(  # never runs here: the latents are random, as a cache would hold them
        block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        latent_channels=16, norm_num_groups=32, scaling_factor=1.5305, shift_factor=0.0609,
    )
    tokenizer = load_clip_tokenizer()
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=CLIPTextModelWithProjection(clip_l), tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(clip_g), tokenizer_2=tokenizer,
        text_encoder_3=T5EncoderModel(t5), tokenizer_3=build_t5_tokenizer(),
    )


def child(choice: str, blocks: int, resolution: int, steps: int) -> None:
    import torch

    from tinv_gui.device import choose_placement
    from tinv_gui.embeddings import encode_with_placeholder, extended_vocabularies_from
    from tinv_gui.families import family_of
    from tinv_gui.methods.textual_inversion import (
        DiffusionLoss,
        LatentCache,
        TokenParts,
        starting_vectors,
    )
    from tinv_gui.models import pipeline_text_widths

    torch.set_grad_enabled(True)
    pipe = build_sd35_medium(blocks)
    family = family_of(pipe)
    for module in (pipe.transformer, pipe.vae, *family.text_encoders(pipe)):
        module.requires_grad_(False).eval()
    family.prepare(pipe)
    placement = choose_placement("cpu", "fp32")
    latent = resolution // 8
    moments = torch.randn(32, latent, latent)  # one picture's cached latent distribution (mean, log-variance)
    latents = LatentCache([moments], 1, pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor)
    token = "<thing>"
    encoded = []
    for tokenizer, text_encoder, length in zip(family.tokenizers(pipe), family.text_encoders(pipe), family.prompt_lengths(pipe)):
        new_id = text_encoder.get_input_embeddings().num_embeddings
        encoded.append([encode_with_placeholder(tokenizer, f"a photo of {token}", token, [new_id], length)])
    parts = TokenParts.of(starting_vectors(pipe, "cat", 1, 0), pipeline_text_widths(pipe), family.trained_encoders(choice), placement.device)
    sampler = RssSampler()
    clock = StepClock(warmup=1, sampler=sampler)
    with extended_vocabularies_from(family.text_encoders(pipe), parts.sources()):
        compute_loss = DiffusionLoss(pipe, placement, latents, encoded, False, 1, False, 0, None, None, parts.trains, 1)
        clock.start()
        for _ in range(steps + 1):
            compute_loss().backward()
            parts.trained.grad = None
            clock.tick()
    modules = (pipe.transformer, *family.text_encoders(pipe))
    report(clock.result(choice=choice, blocks=blocks, parameters_b=sum(p.numel() for m in modules for p in m.parameters()) / 1e9))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    parser.add_argument("--child", nargs=2, metavar=("CHOICE", "BLOCKS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.resolution, args.steps)
        return
    rows = {}
    for choice in CHOICES:
        measured = {}
        for blocks in (1, 2):
            measured[blocks] = run_child(Path(__file__), ["--child", choice, str(blocks), "--resolution", str(args.resolution), "--steps", str(args.steps)], 7200)
            print(f"{choice}, {blocks} block(s): {measured[blocks]}", file=sys.stderr, flush=True)
        one, two = measured[1], measured[2]
        if "error" in one or "error" in two:
            rows[choice] = one if "error" in one else two
            continue
        grow = FULL_BLOCKS - 1
        rows[choice] = {
            "s_1": one["cpu_s_per_step"], "s_2": two["cpu_s_per_step"],
            "s_full": one["cpu_s_per_step"] + grow * (two["cpu_s_per_step"] - one["cpu_s_per_step"]),
            "gb_1": one["steps_peak_rss_gb"], "gb_2": two["steps_peak_rss_gb"],
            "gb_full": one["steps_peak_rss_gb"] + grow * (two["steps_peak_rss_gb"] - one["steps_peak_rss_gb"]),
        }
    print(f"SD 3.5 Medium shapes, {args.resolution} px, batch 1, fp32, CPU; 24-block figures extrapolated from 1 and 2 blocks")
    print_table(rows, [("s_1", "CPU s/step 1 block", "{:.1f}"), ("s_2", "2 blocks", "{:.1f}"), ("s_full", "24 (extrap.)", "{:.0f}"),
                       ("gb_1", "peak GB 1 block", "{:.1f}"), ("gb_2", "2 blocks", "{:.1f}"), ("gb_full", "24 (extrap.)", "{:.1f}")])


if __name__ == "__main__":
    main()
