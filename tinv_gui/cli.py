"""Command line: `python -m tinv_gui train|demo-model ...`, driving the same engine as the app."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path


def _quiet_libraries() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
    except ImportError:
        pass


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="learn a new token from pictures")
    p.add_argument(
        "--method",
        default="quick",
        choices=("quick", "textual-inversion", "quick-then-ti", "caption-init"),
        help="quick (QuickEmbedding, CLIP only), textual-inversion (through the UNet), quick-then-ti "
        "(QuickEmbedding, then textual inversion), caption-init (one vector per caption word, then textual inversion)",
    )
    p.add_argument("--model", default="demo", help="Hub id, diffusers folder, .safetensors/.ckpt file, or 'demo'")
    p.add_argument("--clip-model", default=None, help="CLIP model for CLIP-space methods (default: the one matching --model)")
    p.add_argument("--images", required=True, nargs="+", help="a folder of pictures, or picture files")
    p.add_argument("--token", required=True, help="the new word, e.g. <my-cat>")
    p.add_argument("--init", default=None, help="a word or phrase to start from (default: random)")
    p.add_argument("--vectors", type=int, default=1, help="vectors per token (default 1)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--lr-schedule", default=None, help="constant, linear, cosine, ... (diffusers' get_scheduler)")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--grad-accum", type=int, default=None, help="micro-batches per step (default: the method's)")
    p.add_argument("--scale-lr", action=argparse.BooleanOptionalAction, default=None,
                   help="multiply --lr by batch size x accumulation (default: the method's)")
    p.add_argument("--resolution", type=int, default=None, help="training size in pixels (default: the model's, 512 for SD 1.x)")
    p.add_argument("--no-flip", action="store_true", help="do not also train on mirrored pictures")
    p.add_argument("--gradient-checkpointing", action="store_true", help="less memory, about a third slower")
    p.add_argument("--resume", default=None, metavar="FILE", help="continue from an embedding an earlier run saved (with its optimizer state)")
    p.add_argument("--quick-steps", type=int, default=None, help="quick-then-ti: QuickEmbedding steps before textual inversion (default 100)")
    p.add_argument("--caption", default=None, help="caption-init: the caption to start from (default: BLIP describes the first picture)")
    p.add_argument("--caption-model", default=None, help="caption-init: a BLIP captioning model (default Salesforce/blip-image-captioning-base)")
    p.add_argument("--preview-every", type=int, default=0, help="save a preview picture every N steps (0: none)")
    p.add_argument("--preview-prompt", default=None, help="prompt of the previews; {} stands for the token (default: the first template)")
    p.add_argument("--preview-steps", type=int, default=20, help="denoising steps per preview")
    p.add_argument("--style", default="object", choices=("object", "style"), help="prompt templates to train with")
    p.add_argument("--captions", action="store_true", help="train on each picture's caption (photo.txt beside photo.jpg)")
    p.add_argument("--save-every", type=int, default=0, help="also save a numbered copy every N steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--output", required=True, help="folder for learned_embeds.safetensors")
    p.add_argument("--log-jsonl", default=None, help="write one JSON object per step to this file")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tinv_gui", description="Teach Stable Diffusion a new concept.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    demo = sub.add_parser("demo-model", help="write the offline demo model: DIR/sd and DIR/clip")
    demo.add_argument("dir")
    demo.add_argument("--v-prediction", action="store_true", help="a scheduler that predicts v (like SD 2.x 768)")
    return parser


def _images_arg(values: list[str]):
    return values[0] if len(values) == 1 else values


def settings_from_args(args):
    from .settings import TrainSettings

    return TrainSettings(
        images=_images_arg(args.images),
        token=args.token,
        output_dir=args.output,
        method=args.method,
        model=args.model,
        clip_model=args.clip_model,
        init=args.init,
        vectors=args.vectors,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        lr_schedule=args.lr_schedule,
        warmup_steps=args.warmup_steps,
        grad_accum=args.grad_accum,
        scale_lr=args.scale_lr,
        resolution=args.resolution,
        flip=not args.no_flip,
        gradient_checkpointing=args.gradient_checkpointing,
        resume=args.resume,
        quick_steps=args.quick_steps,
        caption=args.caption,
        caption_model=args.caption_model,
        preview_every=args.preview_every,
        preview_prompt=args.preview_prompt,
        preview_steps=args.preview_steps,
        seed=args.seed,
        style=args.style,
        use_captions=args.captions,
        save_every=args.save_every,
        device=args.device,
        precision=args.precision,
    )


def follow(job, log_jsonl: str | None = None) -> int:
    """Show a job's events in the terminal (progress bar, log lines) until it ends.

    Ctrl-C and SIGTERM ask the job to stop; it saves its embedding and ends. Returns the exit code.
    """
    from tqdm import tqdm

    from .events import Failed, Finished, Log, Preview, Progress

    def stop(signum, frame):  # noqa: ARG001
        if not job.cancelled:
            print("\nstopping after this step; the embedding will be saved...", file=sys.stderr)
        job.cancel()

    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    bar = tqdm(total=job.total_steps or None, unit="step", dynamic_ncols=True, file=sys.stderr)
    log_file = open(log_jsonl, "w", encoding="utf-8") if log_jsonl else None
    code = 1
    try:
        for event in job.events():
            if isinstance(event, Progress):
                bar.total = event.total
                bar.update(event.step - bar.n)
                bar.set_postfix(loss=f"{event.loss:.4f}", phase=event.phase)
                if log_file:
                    log_file.write(json.dumps({k: v for k, v in event.to_dict().items() if k != "event"}) + "\n")
                    log_file.flush()
            elif isinstance(event, Log):
                bar.write(event.message, file=sys.stderr)
            elif isinstance(event, Preview):
                bar.write(f"preview at step {event.step}: {event.path}", file=sys.stderr)
            elif isinstance(event, Finished):
                bar.close()
                for what, path in event.outputs.items():
                    print(f"{what}: {path}")
                if event.stopped_early:
                    print("stopped early; the embedding so far was saved", file=sys.stderr)
                code = 0
            elif isinstance(event, Failed):
                bar.close()
                print(f"error: {event.message}", file=sys.stderr)
                for what, path in event.outputs.items():
                    print(f"kept {what}: {path}", file=sys.stderr)
                code = 2
    finally:
        bar.close()
        if log_file:
            log_file.close()
        for s, handler in old.items():
            signal.signal(s, handler)
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    if args.command == "demo-model":
        from .demo_model import write_demo_model

        out = write_demo_model(args.dir, prediction_type="v_prediction" if args.v_prediction else "epsilon")
        print(f"demo model written: {Path(out) / 'sd'} and {Path(out) / 'clip'}")
        return 0
    if args.command == "train":
        from .engine import Engine
        from .settings import SettingsError

        try:
            job = Engine().train(settings_from_args(args))
        except SettingsError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        return follow(job, args.log_jsonl)
    return 2
