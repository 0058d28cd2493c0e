"""Seconds per textual inversion step and peak memory: tinv-gui against a reference step.

    HF_HUB_OFFLINE=1 python benchmarks/bench_textual_inversion.py [--steps 2] [--warmup 1]

Each runs on the Stable Diffusion 1.5-shaped random-weight model (see shaped_models.py) at 512 px,
batch 1, on the CPU, each in its own subprocess (so each peak resident memory is its own):

- ours: tinv-gui's textual inversion job, exactly as `python -m tinv_gui train --method
  textual-inversion` runs it (model loading through the ModelStore, latents cached once,
  only the new vector trainable, precision chosen by device.choose_placement);
- reference: the step of diffusers' examples/textual_inversion/textual_inversion.py at its
  defaults: the VAE encodes the picture every step, the whole token-embedding matrix is trainable
  with AdamW on it (untouched rows restored after each step), fp32;
- floor: the frozen UNet alone, one forward and the backward to its text conditioning, fp32:
  the least work any exact textual inversion step does, whatever the trainer;
- floor-bf16: the same in bf16 as tinv-gui runs it (weights stored in bf16, under bf16
  autocast). Run where oneDNN has bf16 kernels (AVX-512, native or emulated); on a CPU with
  neither (AVX2 only), bf16 convolutions fall back to kernels ten times slower or worse, and it is
  skipped unless named with --only.

Prints seconds per step (median of the timed steps, after warm-up), CPU seconds per step, the
peak resident memory of the whole process and of the training steps alone, ours/reference, and
ours against the floor of its own precision. The machine's CPU flags and the precision each run
used are printed with the table: set ONEDNN_MAX_CPU_ISA=AVX512_CORE to measure a CPU with native
bf16 as one without.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from measure import (  # noqa: E402
    RssSampler,
    StepClock,
    WholeTableAdamW,
    compare,
    make_pictures,
    print_table,
    report,
)

TOKEN = "<bench-toy>"
INIT = "toy"


def run_ours(args) -> dict:
    from shaped_models import sd15_dir

    from tinv_gui.device import choose_placement
    from tinv_gui.events import Progress, Reporter
    from tinv_gui.jobs import run_training
    from tinv_gui.models import ModelStore
    from tinv_gui.settings import TrainSettings

    model = str(sd15_dir())
    sampler = RssSampler()
    clock = StepClock(args.warmup, sampler)
    work = Path(tempfile.mkdtemp(prefix="bench-ti-"))
    settings = TrainSettings(
        images=str(make_pictures(work / "pictures", 4, args.resolution)), token=TOKEN, init=INIT, output_dir=str(work / "out"),
        method="textual-inversion", model=model, steps=args.warmup + args.steps, batch_size=1, grad_accum=1,
        resolution=args.resolution, device="cpu", precision=args.precision, gradient_checkpointing=args.gradient_checkpointing,
    ).resolved()

    def on_event(event):
        if isinstance(event, Progress):
            clock.tick()  # the first step's time includes loading: it is a warm-up step

    run_training(settings, ModelStore(), Reporter(on_event, total_steps=settings.total_steps))
    return clock.result(precision=precision_name(choose_placement("cpu", args.precision)))


def precision_name(placement) -> str:
    return "fp32" if placement.autocast_dtype is None else "bf16"


def run_reference(args) -> dict:
    """The reference step, written after diffusers' example script (its defaults, batch 1)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from PIL import Image
    from shaped_models import sd15_dir
    from transformers import CLIPTextModel, CLIPTokenizer

    from tinv_gui.data import OBJECT_TEMPLATES

    model = sd15_dir()
    sampler = RssSampler()
    clock = StepClock(args.warmup, sampler)
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")

    tokenizer.add_tokens([TOKEN])
    placeholder_id = tokenizer.convert_tokens_to_ids(TOKEN)
    init_id = tokenizer.encode(INIT, add_special_tokens=False)[0]
    text_encoder.resize_token_embeddings(len(tokenizer))
    table = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        table[placeholder_id] = table[init_id].clone()
    vae.requires_grad_(False)
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    optimizer = WholeTableAdamW(table, placeholder_id, lr=5e-4, weight_decay=1e-2)  # the script's defaults
    text_encoder.train()

    work = Path(tempfile.mkdtemp(prefix="bench-ref-"))
    pictures = [Image.open(p).convert("RGB") for p in sorted(make_pictures(work, 4, args.resolution).iterdir())]
    rng = random.Random(0)

    def example():
        image = pictures[rng.randrange(len(pictures))].resize((args.resolution, args.resolution), Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
        prompt = rng.choice(OBJECT_TEMPLATES).format(TOKEN)
        ids = tokenizer(prompt, padding="max_length", truncation=True, max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
        return pixels, ids

    clock.start()
    for _ in range(args.warmup + args.steps):
        pixels, ids = example()
        latents = vae.encode(pixels).latent_dist.sample().detach() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (1,)).long()
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        hidden = text_encoder(ids)[0]
        prediction = unet(noisy, timesteps, hidden).sample
        if noise_scheduler.config.prediction_type == "epsilon":
            target = noise
        else:
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        loss = F.mse_loss(prediction.float(), target.float(), reduction="mean")
        loss.backward()
        optimizer.step()
        clock.tick()
    return clock.result()


def run_floor(args, precision: str = "fp32") -> dict:
    """The frozen UNet's forward and backward to the conditioning, nothing else, with its weights
    and compute in `precision` as tinv-gui's placement for it has them."""
    import torch
    from diffusers import UNet2DConditionModel
    from shaped_models import sd15_dir

    from tinv_gui.device import choose_placement

    placement = choose_placement("cpu", precision)
    sampler = RssSampler()
    clock = StepClock(args.warmup, sampler)
    unet = UNet2DConditionModel.from_pretrained(sd15_dir(), subfolder="unet", torch_dtype=placement.weight_dtype)
    unet.eval().requires_grad_(False)
    latents = torch.randn(1, 4, args.resolution // 8, args.resolution // 8, dtype=placement.weight_dtype)
    conditioning = torch.randn(1, 77, unet.config.cross_attention_dim, dtype=placement.weight_dtype)
    clock.start()
    for step in range(args.warmup + args.steps):
        hidden = conditioning.clone().requires_grad_(True)
        with placement.autocast():
            prediction = unet(latents, torch.tensor([step * 97 % 1000]), hidden).sample
        prediction.float().pow(2).mean().backward()
        clock.tick()
    return clock.result(precision=precision)


RUNS = {"ours": run_ours, "reference": run_reference, "floor": run_floor, "floor-bf16": lambda args: run_floor(args, "bf16")}


def cpu_flags_line() -> str:
    """The CPU's model and the flags that decide bf16's speed, and any oneDNN ISA cap."""
    import os

    from tinv_gui.device import cpu_flags

    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    flags = sorted(flag for flag in cpu_flags() if flag in {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni"})
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return f"CPU: {model or 'unknown'}; flags {' '.join(flags) or 'none of avx2/avx512'}" + (f"; ONEDNN_MAX_CPU_ISA={cap}" if cap else "")


def default_runs() -> tuple[str, ...]:
    """Every configuration, but the bf16 floor only where oneDNN has bf16 kernels (AVX-512)."""
    from tinv_gui.device import cpu_flags

    if "avx512f" in cpu_flags():
        return tuple(RUNS)
    print("floor-bf16 skipped: this CPU has no AVX-512, and a bf16 UNet runs about ten times slower here "
          "than fp32 (name it with --only floor-bf16 to measure it anyway)", file=sys.stderr)
    return tuple(name for name in RUNS if name != "floor-bf16")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=1, choices=range(1, 10), metavar="N", help="untimed steps first (at least 1)")
    parser.add_argument("--precision", default="auto", help="ours: auto, fp32 or bf16 (the reference is fp32, as at its defaults)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="ours: with gradient checkpointing")
    parser.add_argument("--only", choices=tuple(RUNS), default=None, help="run one configuration")
    parser.add_argument("--resolution", type=int, default=512, help="picture size; a small one (64) measures the weights' memory quickly")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch (default: its own choice)")
    parser.add_argument("--child", choices=tuple(RUNS), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        report({**RUNS[args.child](args), "threads": torch.get_num_threads()})
        return 0
    from shaped_models import sd15_dir

    sd15_dir()  # build the model once, outside the measured processes
    passed = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(torch.get_num_threads()), "--precision", args.precision, "--resolution", str(args.resolution)]
    if args.gradient_checkpointing:
        passed.append("--gradient-checkpointing")
    rows = compare(Path(__file__), default_runs() if args.only is None else (args.only,), passed)
    print(f"textual inversion step, SD 1.5 shapes, {args.resolution} px, batch 1, CPU ({torch.get_num_threads()} threads), "
          f"{args.steps} timed steps after {args.warmup} warm-up")
    print(cpu_flags_line())
    named = {f"{name} ({row.get('precision', 'fp32')})": row for name, row in rows.items()}
    print_table(named, [
        ("s_per_step", "s/step", "{:.2f}"),
        ("cpu_s_per_step", "CPU s/step", "{:.2f}"),
        ("process_peak_rss_gb", "peak RSS GB", "{:.2f}"),
        ("steps_peak_rss_gb", "steps peak GB", "{:.2f}"),
    ])
    ours, ref = rows.get("ours", {}), rows.get("reference", {})
    if ours.get("s_per_step") and ref.get("s_per_step"):
        print(f"ours is {ref['s_per_step'] / ours['s_per_step']:.2f}x faster per step "
              f"(CPU time {ref['cpu_s_per_step'] / ours['cpu_s_per_step']:.2f}x) and uses "
              f"{100 * ours['process_peak_rss_gb'] / ref['process_peak_rss_gb']:.0f}% of the reference's peak memory "
              f"({100 * ours['steps_peak_rss_gb'] / ref['steps_peak_rss_gb']:.0f}% during the steps)")
    for name in ("floor", "floor-bf16"):
        floor = rows.get(name, {})
        if not floor.get("s_per_step"):
            continue
        precision = floor["precision"]
        if ref.get("s_per_step"):
            print(f"the UNet's own forward and backward in {precision} take {floor['s_per_step']:.2f} s: no exact {precision} step "
                  f"here can be more than {ref['s_per_step'] / floor['s_per_step']:.2f}x faster than the reference")
        if ours.get("s_per_step") and ours.get("precision") == precision:
            print(f"ours takes {ours['s_per_step'] / floor['s_per_step']:.2f}x the {precision} floor's time "
                  f"(CPU time {ours['cpu_s_per_step'] / floor['cpu_s_per_step']:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
