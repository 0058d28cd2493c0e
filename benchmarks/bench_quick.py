"""QuickEmbedding: seconds per step at batch 32 (tinv-gui against a reference step) and the
wall time of a whole 100-step run, model loading included.

    HF_HUB_OFFLINE=1 python benchmarks/bench_quick.py [--steps 5] [--warmup 1] [--no-full-run]

On the CLIP ViT-L/14-shaped random-weight model (see shaped_models.py), on the CPU, each
configuration in its own subprocess:

- ours: tinv-gui's QuickEmbedding job (prompts padded to the batch's longest, only the new
  vector trainable, precision chosen by device.choose_placement);
- reference: the step as QuickEmbedding was published: prompts padded to 77 tokens, the whole
  token-embedding matrix trainable with AdamW on it (untouched rows restored), bf16 weights;
- full run: `python -m tinv_gui train --method quick` on four pictures with its defaults
  (100 steps), timed from the command's start to its end.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
import time
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
BATCH = 32


def run_ours(args) -> dict:
    from shaped_models import clip_vit_l14_dir, sd15_dir

    from tinv_gui.events import Progress, Reporter
    from tinv_gui.jobs import run_training
    from tinv_gui.models import ModelStore
    from tinv_gui.settings import TrainSettings

    sampler = RssSampler()
    clock = StepClock(args.warmup, sampler)
    work = Path(tempfile.mkdtemp(prefix="bench-quick-"))
    settings = TrainSettings(
        images=str(make_pictures(work / "pictures", 4, 256)), token=TOKEN, init="toy", output_dir=str(work / "out"),
        method="quick", model=str(sd15_dir()), clip_model=str(clip_vit_l14_dir()), steps=args.warmup + args.steps,
        batch_size=BATCH, device="cpu",
    ).resolved()
    run_training(settings, ModelStore(), Reporter(lambda e: isinstance(e, Progress) and clock.tick(), total_steps=settings.total_steps))
    return clock.result()


def run_reference(args) -> dict:
    """The reference step, written after the published QuickEmbedding notebook's recipe."""
    import torch
    from shaped_models import clip_vit_l14_dir
    from transformers import CLIPModel, CLIPTokenizer

    from tinv_gui.clip_space import spherical_distance
    from tinv_gui.data import OBJECT_TEMPLATES

    sampler = RssSampler()
    clock = StepClock(args.warmup, sampler)
    location = clip_vit_l14_dir()
    model = CLIPModel.from_pretrained(location, dtype=torch.bfloat16).eval()
    tokenizer = CLIPTokenizer.from_pretrained(location)
    tokenizer.add_tokens([TOKEN])
    placeholder_id = tokenizer.convert_tokens_to_ids(TOKEN)
    model.requires_grad_(False)
    embeddings = model.text_model.embeddings
    grown = torch.nn.Embedding(len(tokenizer), embeddings.token_embedding.embedding_dim, dtype=torch.bfloat16)
    with torch.no_grad():
        grown.weight[: embeddings.token_embedding.num_embeddings] = embeddings.token_embedding.weight
    embeddings.token_embedding = grown  # CLIPModel has no resize_token_embeddings: grow the table by hand
    table = grown.weight
    with torch.no_grad():
        table[placeholder_id] = table[tokenizer.encode("toy", add_special_tokens=False)[0]]
    optimizer = WholeTableAdamW(table, placeholder_id, lr=0.1, weight_decay=0.01)
    with torch.no_grad():  # image features are computed once, before the loop, as in ours
        pixels = torch.randn(4, 3, 224, 224, dtype=torch.bfloat16)
        targets = model.get_image_features(pixel_values=pixels)
        targets = (targets.pooler_output if hasattr(targets, "pooler_output") else targets).float()
    rng = random.Random(0)
    clock.start()
    for _ in range(args.warmup + args.steps):
        prompts = [rng.choice(OBJECT_TEMPLATES).format(TOKEN) for _ in range(BATCH)]
        ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        features = model.get_text_features(input_ids=ids)
        features = (features.pooler_output if hasattr(features, "pooler_output") else features).float()
        loss = spherical_distance(features[:, None, :], targets[None, :, :]).mean()
        loss.backward()
        optimizer.step()
        clock.tick()
    return clock.result()


def time_full_run(threads: int | None) -> dict:
    """Wall time of `python -m tinv_gui train --method quick` with its defaults, start to end."""
    import os

    from shaped_models import clip_vit_l14_dir, sd15_dir

    work = Path(tempfile.mkdtemp(prefix="bench-quick-run-"))
    pictures = make_pictures(work / "pictures", 4, 512)
    command = [
        sys.executable, "-m", "tinv_gui", "train", "--method", "quick", "--model", str(sd15_dir()),
        "--clip-model", str(clip_vit_l14_dir()), "--images", str(pictures), "--token", TOKEN, "--init", "toy",
        "--device", "cpu", "--output", str(work / "out"),
    ]
    env = dict(os.environ, PYTHONPATH=str(HERE.parent), HF_HUB_OFFLINE="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=HERE.parent, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    return {"wall_s": wall}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=1, choices=range(1, 10), metavar="N", help="untimed steps first (at least 1)")
    parser.add_argument("--no-full-run", action="store_true", help="skip the whole 100-step run")
    parser.add_argument("--only", choices=("ours", "reference"), default=None, help="run one configuration")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch (default: its own choice)")
    parser.add_argument("--child", choices=("ours", "reference"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        report({**(run_ours(args) if args.child == "ours" else run_reference(args)), "threads": torch.get_num_threads()})
        return 0
    from shaped_models import clip_vit_l14_dir, sd15_dir

    sd15_dir(), clip_vit_l14_dir()  # build the models once, outside the measured processes
    passed = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(torch.get_num_threads())]
    rows = compare(Path(__file__), ("ours", "reference") if args.only is None else (args.only,), passed)
    print(f"QuickEmbedding step, CLIP ViT-L/14 shapes, batch {BATCH}, CPU ({torch.get_num_threads()} threads), "
          f"{args.steps} timed steps after {args.warmup} warm-up")
    print_table(rows, [
        ("s_per_step", "s/step", "{:.3f}"),
        ("cpu_s_per_step", "CPU s/step", "{:.3f}"),
        ("process_peak_rss_gb", "peak RSS GB", "{:.2f}"),
    ])
    ours, ref = rows.get("ours", {}), rows.get("reference", {})
    if ours.get("s_per_step") and ref.get("s_per_step"):
        print(f"ours is {ref['s_per_step'] / ours['s_per_step']:.1f}x faster per step "
              f"(CPU time {ref['cpu_s_per_step'] / ours['cpu_s_per_step']:.1f}x)")
    if not args.no_full_run:
        full = time_full_run(args.threads)
        print("full 100-step QuickEmbedding run on 4 pictures, model loading included: "
              + (f"{full['wall_s']:.1f} s" if "wall_s" in full else f"failed: {full['error']}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
