"""8-bit weights (--fp8-weights) on SD 3.5 Large and Flux.1-dev: what they save, what they cost.

    python benchmarks/bench_fp8.py bytes
    python benchmarks/bench_fp8.py block [--model sd35-large|flux-dev|t5|all]

`bytes`: the weights' bytes of each part of the real shapes (bench_sd3_flux's configs), in bf16
and with the transformer's and T5's linear weights stored by device.store_linear_weights (fp8 and
a float32 scale per output row), counted exactly from the tensors of models built on PyTorch's
meta device (no memory, no time).

`block`: one real-shaped block with random weights (PyTorch's default initialization): SD 3.5
Large's transformer with one MMDiT block, Flux.1-dev's with one double-stream block (their small
embedding and output layers included), or one T5-XXL block, at 1024 px (4096 image tokens; 333
text tokens for SD 3.5, 512 for Flux.1 and T5), batch 1, fp32 compute on the CPU. For each way of
holding the weights, one forward pass and the backward pass of a fixed random direction of the
output (what a loss's gradient there looks like) to the text states: the relative error of the output and of the gradient to one text
token's state (where a learned word sits) against fp32 weights; the CPU seconds of that step; and
the bytes the autograd graph saves for the backward pass beyond the model's own tensors (unique
storages, counted with saved-tensor hooks). The ways:

- fp32: the weights as built;
- fp8 scaled (ours): device.store_linear_weights, fp8 with one scale per output row;
- fp8 direct: each linear weight cast to fp8 and back, unscaled (what kohya's --fp8_base and
  diffusers' layerwise casting store), computed in fp32;
- diffusers layerwise: diffusers.hooks.apply_layerwise_casting (storage fp8, compute fp32) on the
  linear layers, as ModelMixin.enable_layerwise_casting applies it: the same numbers as fp8
  direct, and it shows what the graph keeps.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_sd3_flux import (  # noqa: E402
    build_flux_dev,
    build_sd35,
    flux_dev_transformer,
    sd35_transformer,
    t5_xxl,
)
from measure import print_table  # noqa: E402

GIB = 2**30
WAYS = ("fp32", "fp8 scaled (ours)", "fp8 direct", "diffusers layerwise")


def stored_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()) if t is not None)


def weight_bytes() -> dict[str, dict]:
    """{part: bytes in bf16, bytes with fp8 linear weights} of SD 3.5 Large's and Flux.1-dev's parts."""
    import torch

    from tinv_gui.device import FP8, store_linear_weights

    rows = {}
    with torch.device("meta"):
        pipes = {"SD 3.5 Large": build_sd35("sd35-large", {"mmdit": 38, "t5": 24}), "Flux.1-dev": build_flux_dev({"double": 19, "single": 38, "t5": 24})}
    for title, pipe in pipes.items():
        parts = {"transformer": pipe.transformer, "T5-XXL": pipe.text_encoder_3 if hasattr(pipe, "text_encoder_3") else pipe.text_encoder_2,
                 "CLIP-L": pipe.text_encoder}
        if hasattr(pipe, "text_encoder_2") and title.startswith("SD"):
            parts["OpenCLIP bigG"] = pipe.text_encoder_2
        total = {"bf16_gib": 0.0, "fp8_gib": 0.0}
        for name, module in parts.items():
            module.to(torch.bfloat16)
            bf16 = stored_bytes(module)
            if name in ("transformer", "T5-XXL"):
                store_linear_weights(module, FP8)
            rows[f"{title} {name}"] = {"bf16_gib": bf16 / GIB, "fp8_gib": stored_bytes(module) / GIB, "parameters_b": sum(p.numel() for p in module.parameters()) / 1e9}
            for key in total:
                total[key] += rows[f"{title} {name}"][key]
        rows[f"{title}, these parts"] = {**total, "parameters_b": sum(sum(p.numel() for p in m.parameters()) for m in parts.values()) / 1e9}
    return rows


def block_and_inputs(model: str, resolution: int):
    """(a module with one real-shaped block, a function of the text states giving its output, the text states)."""
    import torch

    from tinv_gui.families import Flux, StableDiffusion3

    torch.manual_seed(0)
    noisy = torch.randn(1, 16, resolution // 8, resolution // 8)
    timesteps = torch.tensor([500.0])
    if model == "t5":
        module = t5_xxl(1).eval()
        text = torch.randn(1, 512, 4096)
        return module, lambda states: module(inputs_embeds=states).last_hidden_state, text
    if model == "sd35-large":
        module, family, text, pooled = sd35_transformer(model, {"mmdit": 1}).eval(), StableDiffusion3(), torch.randn(1, 333, 4096), torch.randn(1, 2048)
    else:
        module, family, text, pooled = flux_dev_transformer({"double": 1, "single": 0}).eval(), Flux(), torch.randn(1, 512, 4096), torch.randn(1, 768)
    return module, lambda states: family.predict(module, noisy, timesteps, states, pooled, None), text


def hold(module, way: str) -> None:
    """Store `module`'s linear weights as `way` says (see the module's docstring)."""
    import torch

    from tinv_gui.device import FP8, store_linear_weights

    if way == "fp8 scaled (ours)":
        store_linear_weights(module, FP8)
    elif way == "fp8 direct":
        with torch.no_grad():
            for layer in module.modules():
                if isinstance(layer, torch.nn.Linear):
                    layer.weight.copy_(layer.weight.to(FP8).float())
    elif way == "diffusers layerwise":
        from diffusers.hooks import apply_layerwise_casting

        for layer in module.modules():
            if isinstance(layer, torch.nn.Linear):
                apply_layerwise_casting(layer, storage_dtype=FP8, compute_dtype=torch.float32, skip_modules_pattern=None)


def measure_block(model: str, resolution: int) -> dict[str, dict]:
    """Each way's errors, CPU seconds and saved bytes for one block of `model`."""
    import torch
    from measure import cpu_seconds

    rows, exact = {}, None
    word = 4  # the text position whose gradient is compared
    for way in WAYS:
        module, run, text = block_and_inputs(model, resolution)  # rebuilt from the same seed: the same weights each time
        module.requires_grad_(False)
        hold(module, way)
        states = text.clone().requires_grad_(True)
        saved = {}

        def pack(tensor):
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        started = cpu_seconds()
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                output = run(states)
            direction = torch.randn(output.shape, generator=torch.Generator().manual_seed(1))  # a loss's gradient at the output
            (gradient,) = torch.autograd.grad((output.float() * direction).sum(), states)
        except RuntimeError as error:  # diffusers' layerwise casting on T5: T5 casts its activations to wo's storage dtype
            print(f"{model}, {way}: fails: {error}", file=sys.stderr, flush=True)
            rows[f"{model}, {way}"] = {"error": str(error)[:120]}
            continue
        cpu_s = cpu_seconds() - started
        own = {t.untyped_storage().data_ptr() for t in (*module.parameters(), *module.buffers()) if t is not None}
        graph_gib = sum(size for pointer, size in saved.items() if pointer not in own) / GIB  # beyond the model's own tensors
        output, gradient = output.detach().float(), gradient[0, word]
        if exact is None:
            exact = output, gradient
        rows[f"{model}, {way}"] = {
            "cpu_s": cpu_s, "graph_gib": graph_gib, "weights_gib": stored_bytes(module) / GIB,
            "output_error": ((output - exact[0]).norm() / exact[0].norm()).item(),
            "gradient_error": ((gradient - exact[1]).norm() / exact[1].norm()).item(),
        }
        print(f"{model}, {way}: {rows[f'{model}, {way}']}", file=sys.stderr, flush=True)
        del module, output, states
    return rows


def main() -> None:

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("bytes", "block"))
    parser.add_argument("--model", choices=("sd35-large", "flux-dev", "t5", "all"), default="all")
    parser.add_argument("--resolution", type=int, default=1024)
    args = parser.parse_args()
    if args.what == "bytes":
        print("weights' bytes, exact (GiB = 2**30 bytes); fp8: the transformer's and T5's linear weights in fp8 with a float32 scale per row")
        print_table(weight_bytes(), [("parameters_b", "parameters (B)", "{:.2f}"), ("bf16_gib", "bf16 GiB", "{:.2f}"), ("fp8_gib", "with fp8 GiB", "{:.2f}")])
        return
    started = time.perf_counter()
    rows = {}
    for model in (("sd35-large", "flux-dev", "t5") if args.model == "all" else (args.model,)):
        rows.update(measure_block(model, args.resolution))
    print(f"{args.resolution} px, batch 1, fp32 compute, CPU ({time.perf_counter() - started:.0f} s wall); errors relative to fp32 weights")
    print_table(rows, [("output_error", "output error", "{:.4f}"), ("gradient_error", "gradient error", "{:.4f}"),
                       ("cpu_s", "CPU s (fwd+bwd)", "{:.1f}"), ("weights_gib", "weights GiB", "{:.2f}"), ("graph_gib", "graph extra GiB", "{:.2f}")])


if __name__ == "__main__":
    main()
