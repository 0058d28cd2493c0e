"""Seconds per step of prompt optimization (continuous and hard) with a CLIP ViT-L/14-shaped
model of random weights, on this machine. Shapes, not weights, set the speed.

Usage: HF_HUB_OFFLINE=1 python benchmarks/prompt_speed.py [--steps 8] [--length 16] [--precision auto]
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tinv_gui.demo_model import load_clip_tokenizer  # noqa: E402
from tinv_gui.device import choose_placement  # noqa: E402
from tinv_gui.events import Progress, Reporter  # noqa: E402
from tinv_gui.methods.prompt_from_image import optimize_prompt, readable_token_ids  # noqa: E402
from tinv_gui.models import ClipBundle  # noqa: E402
from tinv_gui.settings import PromptSettings  # noqa: E402


def vit_l14_clip(placement) -> ClipBundle:
    """openai/clip-vit-large-patch14's shapes with random weights."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    text = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                          projection_dim=768, max_position_embeddings=77, hidden_act="quick_gelu",
                          bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=768)
    model = CLIPModel(config).eval().requires_grad_(False).to(placement.device)
    return ClipBundle(model, load_clip_tokenizer(), 224, (0.48145466, 0.4578275, 0.40821073),
                      (0.26862954, 0.26130258, 0.27577711), placement, "random ViT-L/14")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--length", type=int, default=16)
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()
    torch.manual_seed(0)
    placement = choose_placement("auto", args.precision)
    clip = vit_l14_clip(placement)
    picture = __import__("PIL.Image", fromlist=["Image"]).new("RGB", (256, 256), (120, 80, 40))
    start = time.perf_counter()
    readable_token_ids(clip.tokenizer)
    print(f"readable vocabulary, once per tokenizer: {time.perf_counter() - start:.2f} s")
    print(f"{placement.describe()}, {torch.get_num_threads()} threads, prompt length {args.length}")
    for hard in (False, True):
        clocks = []  # (wall seconds, this process's CPU seconds) at the end of each step
        record = lambda e: clocks.append((e.elapsed_s, time.process_time())) if isinstance(e, Progress) else None  # noqa: E731
        reporter = Reporter(record, total_steps=args.steps)
        settings = PromptSettings(images=["x"], hard=hard, length=args.length, steps=args.steps).resolved()
        start = time.perf_counter()
        optimize_prompt(clip, [picture], settings, reporter)
        total = time.perf_counter() - start
        # The first step warms up. On a shared machine the fastest step is the best estimate of
        # the uncontended cost (as timeit reports); CPU seconds over all threads show the work.
        walls = [b[0] - a[0] for a, b in zip(clocks, clocks[1:])]
        cpus = [b[1] - a[1] for a, b in zip(clocks, clocks[1:])]
        print(f"{settings.mode:>10}: {min(walls):.3f} s/step wall at best, {statistics.median(walls):.3f} median; "
              f"{min(cpus):.3f} CPU s/step at best; {args.steps} steps, {total:.1f} s in all incl. the picture's "
              f"embedding; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
