"""Is the automatic precision the faster one on this CPU? fp32 against bf16, per kind of work.

    python benchmarks/bench_precision.py [--repeats 3]

Each kind of work is timed on a piece with Stable Diffusion 1.5's and CLIP ViT-L/14's shapes
(random weights, built here), in fp32 and in bf16 exactly as device.choose_placement runs it
(weights stored in bf16, under bf16 autocast):

- diffusion step: one of the UNet's cross-attention down blocks (320 channels, at 32x32
  latents), forward and backward to its text conditioning;
- generation: the same block's forward, without gradients;
- CLIP-space methods and prompt search: one CLIP text-tower layer (width 768), forward and
  backward, on a batch of 32 prompts of 20 tokens (QuickEmbedding) and on one prompt (search).

Prints CPU seconds per call (the fastest of --repeats, so other work on the machine matters
less), bf16's speed-up, and what the automatic choice picked. Set ONEDNN_MAX_CPU_ISA=AVX512_CORE
to measure a CPU with native bf16 as one without. Without AVX-512, bf16 convolutions are so slow
that the diffusion rows take a minute or two.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from tinv_gui.device import choose_placement  # noqa: E402


def unet_block() -> torch.nn.Module:
    """One of SD 1.5's UNet cross-attention down blocks (320 channels, one ResNet and one transformer)."""
    from diffusers.models.unets.unet_2d_blocks import CrossAttnDownBlock2D

    return CrossAttnDownBlock2D(in_channels=320, out_channels=320, temb_channels=1280, num_layers=1,
                                cross_attention_dim=768, num_attention_heads=8, add_downsample=False)


def clip_text_layer() -> torch.nn.Module:
    """One layer of CLIP ViT-L/14's text tower."""
    from transformers import CLIPTextConfig
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer

    return CLIPEncoderLayer(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, hidden_act="quick_gelu"))


def call_block(block, latents, time_embedding, conditioning):
    return block(latents, time_embedding, encoder_hidden_states=conditioning)[0]


def call_layer(layer, hidden):
    out = layer(hidden, None)
    return out[0] if isinstance(out, tuple) else out


def cpu_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: kernels chosen, weights reordered
    best = float("inf")
    for _ in range(repeats):
        started = time.process_time()
        fn()
        best = min(best, time.process_time() - started)
    return best


def timed(module, inputs, call, grad_input: int | None, precision: str, repeats: int) -> float:
    placement = choose_placement("cpu", precision)
    module = module.to(placement.weight_dtype).eval().requires_grad_(False)
    inputs = [x.to(placement.weight_dtype) for x in inputs]

    def run():
        args = [x.clone().requires_grad_(i == grad_input) for i, x in enumerate(inputs)]
        with placement.autocast(), torch.set_grad_enabled(grad_input is not None):
            out = call(module, *args)
        if grad_input is not None:
            out.float().pow(2).mean().backward()

    return cpu_seconds(run, repeats)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    block, layer = unet_block(), clip_text_layer()
    block_inputs = (torch.randn(1, 320, 32, 32), torch.randn(1, 1280), torch.randn(1, 77, 768))
    kinds = [  # (name, module, inputs, call, which input gets a gradient: None for no backward)
        ("diffusion step (UNet block, fwd+bwd)", block, block_inputs, call_block, 2),
        ("generation (UNet block, forward)", block, block_inputs, call_block, None),
        ("QuickEmbedding (CLIP text layer, batch 32, fwd+bwd)", layer, (torch.randn(32, 20, 768),), call_layer, 0),
        ("prompt search (CLIP text layer, batch 1, fwd+bwd)", layer, (torch.randn(1, 20, 768),), call_layer, 0),
    ]
    auto = choose_placement("cpu", "auto")
    chosen = "fp32" if auto.autocast_dtype is None else "bf16"
    print(f"automatic choice: {auto.describe()}")
    print(f"{'kind of work':55}{'fp32 CPU s':>12}{'bf16 CPU s':>12}{'bf16 speed-up':>15}  faster  auto")
    for name, module, inputs, call, grad_input in kinds:
        fp32 = timed(module, inputs, call, grad_input, "fp32", args.repeats)
        bf16 = timed(module, inputs, call, grad_input, "bf16", args.repeats)
        faster = "bf16" if bf16 < fp32 else "fp32"
        print(f"{name:55}{fp32:12.3f}{bf16:12.3f}{fp32 / bf16:14.2f}x  {faster:6}  {chosen}{'' if faster == chosen else '  <- not the faster'}",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
