"""What a textual-inversion step costs on SD 3.5 Medium, SD 3.5 Large and Flux.1-dev, per choice
of the text encoders that learn.

    python benchmarks/bench_sd3_flux.py [--model sd35-medium|sd35-large|flux-dev|all] [--resolution 1024] [--steps 2]

Runs our own step (methods.textual_inversion.DiffusionLoss with the family's conditioning and
flow matching, then the backward pass to the token's vectors) on a pipeline with the model's
shapes and random weights, built here from configs (nothing is downloaded), at the native
1024 px (128x128 latents, 4096 image tokens), batch 1, fp32 (this CPU computes bf16 5-17x slower,
emulated). The shapes, checked against the models' diffusers configs (transformer/config.json as
quoted by public code that builds these models from configs: sglang's and fastvideo's SD3 and
Flux arch configs, taproot's and tt-metal's SD 3.5 Large configs, BFL's flux-dev params):

- SD 3.5 Medium (StableDiffusion3Pipeline): MMDiT-X of 24 layers, 24 heads x 64 (width 1536),
  RMS-normed queries and keys, pos_embed_max_size 384, dual attention in layers 0-12; CLIP-L and
  OpenCLIP bigG text towers with projections, T5-XXL (24 layers, width 4096, 64 heads, gated-GELU
  feed-forward 10240) reading 256 tokens (77 + 77 + 256 text tokens, the CLIPs side by side).
- SD 3.5 Large: MMDiT of 38 layers, 38 heads x 64 (width 2432, caption_projection_dim 2432),
  RMS-normed queries and keys, no dual attention, pos_embed_max_size 192; the same text encoders.
- Flux.1-dev (FluxPipeline): FluxTransformer2DModel of 19 double-stream and 38 single-stream
  blocks, 24 heads x 128 (width 3072), rotary axes (16, 56, 56), 64 input channels (2x2-packed
  16-channel latents), joint_attention_dim 4096, pooled_projection_dim 768, guidance embedding;
  CLIP-L (its pooled output) and T5-XXL reading 512 tokens (dev's max_sequence_length).

Whole models (8-17 B parameters, 32-68 GB in fp32) do not fit this 24 GiB machine beside the
others' work, so each is measured with few blocks and extrapolated linearly per kind of block
(the MMDiT's, Medium's dual-attention ones apart; Flux's double and single ones; T5's):

- a base configuration with one block of each kind, once per encoder choice;
- the base plus one more block of one kind, once per kind, with every encoder learning ("all");
  the difference to the base is what one block of that kind costs;
- full = base(choice) + sum over kinds of (blocks of that kind - 1) x its cost.

A transformer block's cost does not depend on the choice (its backward runs to the whole prompt
either way), nor a T5 block's when T5 learns (all, t5). When it does not (clip), T5 runs once
before the steps: its blocks cost no step time, and only their fp32 weights stay in memory.
Each configuration runs in its own process; the figures are CPU seconds (wall seconds swing
with the other work of a shared machine) and the peak resident memory of the timed steps after
`--warmup` untimed ones (with none, the first step's one-time setup is in its figures).

The peak memory a GPU user would see, in bf16, is estimated, not measured: the weights on the
GPU in bf16 (2 bytes a parameter, counted from the built modules and extrapolated like the
rest; the text encoders that do not learn leave the GPU during the steps) plus the activations
at half their fp32 size, the activations being the measured resident memory less the fp32
weights and the process's memory before the model was built. With gradient checkpointing the
transformer keeps only each block's inputs (tokens x width, bf16) and one block's activations
(those of the base configuration); T5's, when it learns, are kept as without.

Choices (setting train_encoders): all (every text encoder runs forward and backward each step),
clip (T5's states computed once, before the steps), t5 (the CLIPs' states computed once).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import RssSampler, StepClock, print_table, report, rss_bytes, run_child  # noqa: E402

CHOICES = ("all", "clip", "t5")
# Each model's kinds of blocks and how many of each the real model has.
FULL_BLOCKS = {
    "sd35-medium": {"dual": 13, "mmdit": 11, "t5": 24},
    "sd35-large": {"mmdit": 38, "t5": 24},
    "flux-dev": {"double": 19, "single": 38, "t5": 24},
}
TITLES = {"sd35-medium": "SD 3.5 Medium", "sd35-large": "SD 3.5 Large", "flux-dev": "Flux.1-dev"}
# The transformer's width and the text tokens beside the image's, for the checkpointed blocks' inputs.
WIDTH = {"sd35-medium": 1536, "sd35-large": 2432, "flux-dev": 3072}
TEXT_TOKENS = {"sd35-medium": 77 + 256, "sd35-large": 77 + 256, "flux-dev": 512}


def clip_config(width: int, layers: int, heads: int, act: str):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers, num_attention_heads=heads,
                          projection_dim=width, hidden_act=act, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)


def t5_xxl(blocks: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=blocks, num_heads=64,
                                   feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, is_encoder_decoder=False, use_cache=False))


def flow_vae(scaling_factor: float, shift_factor: float):
    """A one-level 16-channel VAE: it never runs here (the latents are random, as a cache would hold them)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                         latent_channels=16, norm_num_groups=32, scaling_factor=scaling_factor, shift_factor=shift_factor)


def sd35_transformer(model: str, blocks: dict[str, int]):
    """An SD3Transformer2DModel with SD 3.5 Medium's or Large's shapes, `blocks` of each kind, random weights."""
    from diffusers import SD3Transformer2DModel

    if model == "sd35-medium":  # the dual-attention layers come first, the last layer reads the prompt only
        layers, heads, max_pos, dual = blocks["dual"] + blocks["mmdit"], 24, 384, tuple(range(blocks["dual"]))
    else:
        layers, heads, max_pos, dual = blocks["mmdit"], 38, 192, ()
    return SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, num_layers=layers, attention_head_dim=64, num_attention_heads=heads,
        joint_attention_dim=4096, caption_projection_dim=64 * heads, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=max_pos, dual_attention_layers=dual, qk_norm="rms_norm",
    )


def flux_dev_transformer(blocks: dict[str, int]):
    """A FluxTransformer2DModel with Flux.1-dev's shapes, `blocks` of each kind, random weights."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=blocks["double"], num_single_layers=blocks["single"], attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
    )


def build_sd35(model: str, blocks: dict[str, int]):
    """A StableDiffusion3Pipeline with SD 3.5 Medium's or Large's shapes, `blocks` of each kind, random weights."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    from tinv_gui.demo_model import load_clip_tokenizer
    from tinv_gui.demo_sd3_flux import build_t5_tokenizer

    transformer = sd35_transformer(model, blocks)
    tokenizer = load_clip_tokenizer()
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=flow_vae(1.5305, 0.0609),
        text_encoder=CLIPTextModelWithProjection(clip_config(768, 12, 12, "quick_gelu")), tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(clip_config(1280, 32, 20, "gelu")), tokenizer_2=tokenizer,
        text_encoder_3=t5_xxl(blocks["t5"]), tokenizer_3=build_t5_tokenizer(),
    )


def build_flux_dev(blocks: dict[str, int]):
    """A FluxPipeline with Flux.1-dev's shapes, `blocks` of each kind, random weights."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextModel

    from tinv_gui.demo_model import load_clip_tokenizer
    from tinv_gui.demo_sd3_flux import build_t5_tokenizer

    transformer = flux_dev_transformer(blocks)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(
        transformer=transformer, scheduler=scheduler, vae=flow_vae(0.3611, 0.1159),
        text_encoder=CLIPTextModel(clip_config(768, 12, 12, "quick_gelu")), tokenizer=load_clip_tokenizer(),
        text_encoder_2=t5_xxl(blocks["t5"]), tokenizer_2=build_t5_tokenizer(),
    )


def child(model: str, choice: str, blocks: dict[str, int], resolution: int, steps: int, warmup: int) -> None:
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
    before_gb = rss_bytes() / 2**30  # the libraries, before any weight
    torch.manual_seed(0)
    pipe = build_flux_dev(blocks) if model == "flux-dev" else build_sd35(model, blocks)
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
    clock = StepClock(warmup=warmup, sampler=sampler)
    with extended_vocabularies_from(family.text_encoders(pipe), parts.sources()):
        compute_loss = DiffusionLoss(pipe, placement, latents, encoded, False, 1, False, 0, None, None, parts.trains, 1)
        clock.start()
        for _ in range(steps + warmup):
            compute_loss().backward()
            parts.trained.grad = None
            clock.tick()
    parameters = {"transformer": sum(p.numel() for p in pipe.transformer.parameters())}
    for index, text_encoder in enumerate(family.text_encoders(pipe)):
        parameters[f"text_encoder_{index}"] = sum(p.numel() for p in text_encoder.parameters())
    report(clock.result(model=model, choice=choice, blocks=blocks, trains=list(parts.trains), t5_index=family.t5_encoder,
                        before_gb=before_gb, parameters=parameters))


def configurations(model: str) -> dict[str, tuple[str, dict[str, int]]]:
    """name -> (choice, blocks) of each process a model's figures need."""
    base = {kind: 1 for kind in FULL_BLOCKS[model]}
    runs = {f"{model} base {choice}": (choice, base) for choice in CHOICES}
    runs.update({f"{model} +1 {kind}": ("all", {**base, kind: 2}) for kind in base})
    return runs


def run_name(result: dict) -> str:
    blocks = result["blocks"]
    grown = [kind for kind, count in blocks.items() if count == 2]
    return f"{result['model']} +1 {grown[0]}" if grown else f"{result['model']} base {result['choice']}"


def t5_block_parameters() -> int:
    """One T5-XXL block's parameters, counted on a model built without memory."""
    import torch

    with torch.device("meta"):
        return sum(p.numel() for p in t5_xxl(2).parameters()) - sum(p.numel() for p in t5_xxl(1).parameters())


def extrapolate(model: str, measured: dict[str, dict], resolution: int) -> tuple[dict, dict]:
    """The whole model's figures per choice, and each kind of block's cost, from the base and
    one-more-block runs (see the module's docstring). A figure whose runs are missing is left out."""
    gib = 2**30
    full = FULL_BLOCKS[model]
    base_all = measured[f"{model} base all"]

    def resident(result):  # the step's peak less the libraries' memory before the model
        return result["steps_peak_rss_gb"] - result["before_gb"]

    kinds = {}
    for kind in full:
        plus = measured.get(f"{model} +1 {kind}")
        if plus is None:
            continue
        parameters = {m: plus["parameters"][m] - base_all["parameters"][m] for m in plus["parameters"]}
        weights_gb = 4 * sum(parameters.values()) / gib
        grown_gb = resident(plus) - resident(base_all)
        kinds[kind] = {"cpu_s": plus["cpu_s_per_step"] - base_all["cpu_s_per_step"], "rss_gb": grown_gb,
                       "weights_fp32_gb": weights_gb, "activations_fp32_gb": max(0.0, grown_gb - weights_gb), "parameters": parameters}
    image_tokens = (resolution // 16) ** 2
    block_inputs_gb = (image_tokens + TEXT_TOKENS[model]) * WIDTH[model] * 2 / gib  # one block's inputs in bf16
    rows = {}
    for choice in CHOICES:
        base = measured.get(f"{model} base {choice}")
        if base is None:
            continue
        t5_learns = base["trains"][base["t5_index"]]
        t5_key = f"text_encoder_{base['t5_index']}"
        if any(kind not in kinds for kind in full if kind != "t5" or t5_learns):
            continue
        block_parameters = {kind: cost["parameters"] for kind, cost in kinds.items()}
        block_parameters.setdefault("t5", {m: (t5_block_parameters() if m == t5_key else 0) for m in base["parameters"]})
        extra = {kind: count - 1 for kind, count in full.items()}
        parameters = {m: n + sum(extra[k] * block_parameters[k][m] for k in full) for m, n in base["parameters"].items()}
        learning = ["transformer"] + [f"text_encoder_{i}" for i, t in enumerate(base["trains"]) if t]
        gpu_weights_gb = 2 * sum(parameters[m] for m in learning) / gib
        activations_gb = resident(base) - 4 * sum(base["parameters"].values()) / gib
        kept_activations_gb = activations_gb  # with gradient checkpointing: the base's (one block of each kind), T5's
        cpu_s, rss_gb = base["cpu_s_per_step"], base["steps_peak_rss_gb"]
        for kind, count in extra.items():
            if kind == "t5" and not t5_learns:  # T5 ran once before the steps; its weights stay in RAM
                rss_gb += count * 4 * sum(block_parameters[kind].values()) / gib
                continue
            cpu_s += count * kinds[kind]["cpu_s"]
            rss_gb += count * kinds[kind]["rss_gb"]
            activations_gb += count * kinds[kind]["activations_fp32_gb"]
            kept_activations_gb += count * (kinds[kind]["activations_fp32_gb"] if kind == "t5" else 0.0)
        transformer_blocks = sum(count for kind, count in extra.items() if kind != "t5")
        rows[f"{TITLES[model]}, {choice}"] = {
            "base_s": base["cpu_s_per_step"], "base_gb": base["steps_peak_rss_gb"], "cpu_s": cpu_s, "rss_gb": rss_gb,
            "weights_bf16_gb": gpu_weights_gb, "all_weights_bf16_gb": 2 * sum(parameters.values()) / gib,
            "t5_bf16_gb": 2 * parameters[t5_key] / gib,
            "gpu_gb": gpu_weights_gb + activations_gb / 2,
            "gpu_checkpointed_gb": gpu_weights_gb + kept_activations_gb / 2 + transformer_blocks * block_inputs_gb,
            "parameters_b": sum(parameters.values()) / 1e9,
        }
    return rows, kinds


def read_results(path: Path | None) -> dict[str, dict]:
    """Configurations measured earlier (one child's result line each), so a run continues."""
    import json

    if path is None or not path.exists():
        return {}
    results = [json.loads(line.removeprefix("RESULT ")) for line in path.read_text().splitlines() if line.strip()]
    return {run_name(result): result for result in results}


def main() -> None:
    import json

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=(*FULL_BLOCKS, "all"), default="all")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=2, help="timed steps after the warm-up")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (0: the first step is timed, its one-time setup included)")
    parser.add_argument("--results", type=Path, help="keep each configuration's result in this file and reuse those already there")
    parser.add_argument("--table-only", action="store_true", help="print what --results holds, measuring nothing")
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "CHOICE", "BLOCKS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model, choice, blocks = args.child
        child(model, choice, {k: int(v) for k, v in (item.split("=") for item in blocks.split(","))}, args.resolution, args.steps, args.warmup)
        return
    measured = read_results(args.results)
    models = list(FULL_BLOCKS) if args.model == "all" else [args.model]
    rows, costs = {}, {}
    for model in models:
        for name, (choice, blocks) in configurations(model).items():
            if name not in measured and not args.table_only:
                blocks_arg = ",".join(f"{kind}={count}" for kind, count in blocks.items())
                result = run_child(Path(__file__), ["--child", model, choice, blocks_arg, "--resolution", str(args.resolution), "--steps", str(args.steps), "--warmup", str(args.warmup)], 7200)
                print(f"{name}: {result}", file=sys.stderr, flush=True)
                if "error" in result:
                    rows[name] = result
                    continue
                measured[name] = result
                if args.results:
                    with args.results.open("a") as f:
                        f.write(json.dumps(result) + "\n")
        if f"{model} base all" in measured:
            model_rows, kinds = extrapolate(model, measured, args.resolution)
            rows.update(model_rows)
            costs.update({f"{TITLES[model]}, {kind} block": cost for kind, cost in kinds.items()})
    print(f"{args.resolution} px, batch 1, fp32, CPU; whole models extrapolated per kind of block (one more block of a kind, every encoder learning); GB = 2**30 bytes; GPU figures: bf16, estimated")
    if costs:
        print_table(costs, [("cpu_s", "CPU s/step", "{:.1f}"), ("rss_gb", "peak GB", "{:.2f}"), ("weights_fp32_gb", "fp32 weights GB", "{:.2f}"),
                            ("activations_fp32_gb", "activations GB", "{:.2f}")])
    if rows:
        print()
        print_table(rows, [("base_s", "CPU s/step base", "{:.1f}"), ("base_gb", "peak GB base", "{:.1f}"), ("cpu_s", "CPU s/step whole", "{:.0f}"),
                           ("rss_gb", "peak GB whole", "{:.0f}"), ("all_weights_bf16_gb", "bf16 weights, all", "{:.1f}"),
                           ("weights_bf16_gb", "on GPU in steps", "{:.1f}"), ("gpu_gb", "GPU peak (est.)", "{:.0f}"),
                           ("gpu_checkpointed_gb", "checkpointed (est.)", "{:.0f}")])


if __name__ == "__main__":
    main()
