"""Command line: `python -m tinv_gui train|convert|evaluate|optimize-prompt|generate|demo-model ...`, driving the same engine as the app."""

from __future__ import annotations

import argparse
import json
import os
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
    p.add_argument("--model", default="demo", help="Hub id, diffusers folder, .safetensors/.ckpt file, or 'demo' / 'demo-sdxl'")
    p.add_argument("--clip-model", default=None, help="CLIP model for CLIP-space methods (default: the one matching --model)")
    p.add_argument("--clip-model-g", default=None, help="SDXL: CLIP model of its second text encoder (default: OpenCLIP ViT-bigG/14)")
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


def _add_convert(sub) -> None:
    from .formats import FORMATS

    p = sub.add_parser("convert", help="rewrite an embedding file for another tool")
    p.add_argument(
        "input", nargs="+", help="an embedding file in any layout (diffusers, A1111 .pt/.safetensors/.png, kohya, OneTrainer, "
        "a LoRA with an embedding); for diffusers' SDXL output, its two files (learned_embeds, learned_embeds_2)"
    )
    p.add_argument("--picture", default=None, help="a1111-png: the card's preview picture (default: a plain one with the name)")
    p.add_argument("--format", required=True, choices=tuple(FORMATS), help="; ".join(f"{k}: {v}" for k, v in FORMATS.items()))
    p.add_argument("--output", required=True, help="the file to write, or a folder to write the format's usual file name into")
    p.add_argument("--token", default=None, help="rename the embedding (default: the name the file holds)")


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="score an embedding: CLIP image and text similarity, against its initializer word")
    p.add_argument("--model", default="demo", help="Hub id, diffusers folder, .safetensors/.ckpt file, or 'demo' / 'demo-sdxl'")
    p.add_argument("--embedding", required=True, help="the embedding file (any layout)")
    p.add_argument("--images", required=True, nargs="+", help="the training pictures: a folder or picture files")
    p.add_argument("--prompt", required=True, help="a prompt using the token, e.g. 'a photo of <my-cat> on a beach'")
    p.add_argument("--n", type=int, default=8, help="pictures to generate for the token, and as many for the baseline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=30, help="denoising steps per picture")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--init", default=None, help="baseline word (default: the initializer the file records)")
    p.add_argument("--clip-model", default=None, help="CLIP model to score with (default: the one matching --model)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    p.add_argument("--save-images", default=None, help="keep the generated pictures in this folder")


def _add_model_and_device(p) -> None:
    p.add_argument("--model", default="demo", help="Hub id, diffusers folder, .safetensors/.ckpt file, or 'demo' / 'demo-sdxl'")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))


def _add_optimize_prompt(sub) -> None:
    p = sub.add_parser("optimize-prompt", help="find the prompt that describes a picture (continuous, or readable with --hard)")
    _add_model_and_device(p)
    p.add_argument("--clip-model", default=None, help="CLIP model (default: the one matching --model)")
    p.add_argument("--clip-model-g", default=None, help="SDXL, continuous: CLIP model of its second text encoder (default: OpenCLIP ViT-bigG/14)")
    p.add_argument("--image", required=True, action="append", help="a picture to describe; repeat for several")
    p.add_argument("--image-weight", type=float, action="append", default=None, help="weight of each --image, in order (default: equal)")
    p.add_argument("--prompt", default="", help="where to start (default: empty)")
    p.add_argument("--anchor", default=None, help="a prompt whose meaning the result should stay near")
    p.add_argument("--anchor-weight", type=float, default=0.5)
    p.add_argument("--negative", default=None, help="a negative prompt, optimized to move away from the picture")
    p.add_argument("--length", type=int, default=None, help="tokens in the prompt (default 16, or the --prompt's length)")
    p.add_argument("--steps", type=int, default=None, help="default 40, or 300 with --hard")
    p.add_argument("--lr", type=float, default=None, help="default 0.01, or 0.1 with --hard")
    p.add_argument("--hard", action="store_true", help="readable words (Hard Prompts Made Easy) instead of free vectors")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", required=True, help="folder for prompt_embeds.safetensors or prompt.txt, and result.json")
    p.add_argument("--log-jsonl", default=None, help="write one JSON object per step to this file")


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="make a picture with learned embeddings or optimized prompt embeddings")
    _add_model_and_device(p)
    p.add_argument(
        "--embedding", action="append", default=[],
        help="an embedding file whose name the prompt uses (the name the Playground shows); repeatable. diffusers' SDXL output is two files: give both",
    )
    p.add_argument("--prompt-embeds", default=None, help="prompt_embeds.safetensors from optimize-prompt (instead of --prompt)")
    p.add_argument("--prompt", default=None)
    p.add_argument("--negative", default=None)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", default=None, help="WIDTHxHEIGHT, e.g. 512x512 (default: the model's own size)")
    p.add_argument("--output", required=True, help="the PNG to write")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tinv_gui", description="Teach Stable Diffusion a new concept.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_convert(sub)
    _add_evaluate(sub)
    _add_optimize_prompt(sub)
    _add_generate(sub)
    demo = sub.add_parser("demo-model", help="write the offline demo model: DIR/sd and DIR/clip")
    demo.add_argument("dir")
    demo.add_argument("--v-prediction", action="store_true", help="a scheduler that predicts v (like SD 2.x 768)")
    shape = demo.add_mutually_exclusive_group()
    shape.add_argument("--sdxl", action="store_true", help="SDXL-shaped instead: DIR/sd, DIR/clip_l and DIR/clip_g")
    shape.add_argument("--sd3", action="store_true", help="SD 3.5-shaped instead (CLIP-L, bigG, T5): DIR/sd, DIR/clip_l and DIR/clip_g")
    shape.add_argument("--flux", action="store_true", help="Flux.1-dev-shaped instead (CLIP-L, T5): DIR/sd and DIR/clip_l")
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
        clip_model_g=args.clip_model_g,
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


def eval_settings_from_args(args):
    from .evaluate import EvalSettings

    return EvalSettings(
        model=args.model,
        embedding=args.embedding,
        images=_images_arg(args.images),
        prompt=args.prompt,
        n=args.n,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        init=args.init,
        clip_model=args.clip_model,
        device=args.device,
        precision=args.precision,
        save_images=args.save_images,
        json_path=args.json,
    )


def _run_job(submit, log_jsonl: str | None = None) -> int:
    """Submit a job to a new engine and follow it; bad settings end it before it is queued."""
    from .engine import Engine
    from .settings import SettingsError

    engine = Engine()
    try:
        try:
            job = submit(engine)
        except SettingsError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        return follow(job, log_jsonl)
    finally:
        engine.close()  # the process may end once this returns: no thread of ours is left running


# Exit statuses: a run stopped by a signal ends with 128 + the signal's number, as a shell
# reports a process the signal killed (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP), but only after
# saving what it trained so far.
EXIT_FAILED = 2
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


def _detach_from_hung_up_terminal() -> None:
    """After SIGHUP the terminal is gone and writing to it fails (EIO): send what would have gone
    there to /dev/null instead, leaving files and pipes alone."""
    import stat

    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        try:
            if stat.S_ISCHR(os.fstat(fd).st_mode) and not os.isatty(fd):
                os.dup2(devnull, fd)
        except OSError:
            pass
    os.close(devnull)


def _say(message: str, file=None) -> None:
    """Print, unless the terminal is gone."""
    try:
        print(message, file=file or sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


class _StepLog:
    """The --log-jsonl file. A log that cannot be written (a full disk...) is given up with one
    warning: it never stops the run, so it never costs the embedding."""

    def __init__(self, path: str | None):
        self.path = path
        self.file = open(path, "w", encoding="utf-8") if path else None  # noqa: SIM115 - closed by close()

    def write(self, row: dict) -> None:
        if self.file is None:
            return
        try:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        except OSError as error:
            _say(f"warning: cannot write the log {self.path} ({_os_error_text(error)}); training goes on without it")
            self.close()

    def close(self) -> None:
        file, self.file = self.file, None
        if file is not None:
            try:
                file.close()
            except OSError:
                pass


def _os_error_text(error: OSError) -> str:
    import errno

    return "the disk is full" if error.errno == errno.ENOSPC else (error.strerror or str(error))


def follow(job, log_jsonl: str | None = None) -> int:
    """Show a job's events in the terminal (progress bar, log lines) until it ends.

    Ctrl-C, SIGTERM and SIGHUP ask the job to stop; it saves its embedding and ends. Returns the
    exit status: 0 done, 2 failed, 128 + the signal's number when a signal stopped it early."""
    from tqdm import tqdm

    received: list[int] = []

    def stop(signum, frame):  # noqa: ARG001
        if hasattr(signal, "SIGHUP") and signum == signal.SIGHUP:
            _detach_from_hung_up_terminal()
        elif not job.cancelled:
            _say("\nstopping after this step; the embedding will be saved...")
        received.append(signum)
        job.cancel()

    # Under `accelerate launch`, only the main process draws the bar, writes the log and lists
    # outputs; the others print their log lines with their number.
    from .distributed import launched_with_several_processes

    rank = int(os.environ.get("RANK", "0")) if launched_with_several_processes() else 0
    prefix = f"[process {rank + 1}] " if rank else ""
    try:
        step_log = _StepLog(log_jsonl if rank == 0 else None)
    except OSError as error:
        job.cancel()
        print(f"error: cannot write the log {log_jsonl}: {_os_error_text(error)}", file=sys.stderr)
        return EXIT_FAILED
    # nohup (SIGHUP ignored) keeps its meaning: only signals that would end the process stop the run.
    old = {s: signal.signal(s, stop) for s in STOP_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN}
    bar = tqdm(total=job.total_steps or None, unit="step", dynamic_ncols=True, file=sys.stderr, disable=rank > 0)
    code = 1
    try:
        for event in job.events():
            try:
                code = _show(event, bar, step_log, prefix, rank, received, code)
            except OSError:  # the terminal went away mid-line; the run and its files matter more
                pass
    finally:
        try:
            bar.close()
        except OSError:
            pass
        step_log.close()
        for s, handler in old.items():
            signal.signal(s, handler)
    return code


def _show(event, bar, step_log: _StepLog, prefix: str, rank: int, received: list[int], code: int) -> int:
    """Show one event of `follow`; returns the exit status so far."""
    from .events import Failed, Finished, Log, Preview, Progress

    if isinstance(event, Progress):
        bar.total = event.total
        bar.update(event.step - bar.n)
        bar.set_postfix(loss=f"{event.loss:.4f}", phase=event.phase)
        step_log.write({k: v for k, v in event.to_dict().items() if k != "event"})
    elif isinstance(event, Log):
        bar.write(prefix + event.message, file=sys.stderr)
    elif isinstance(event, Preview):
        bar.write(f"preview at step {event.step}: {event.path}", file=sys.stderr)
    elif isinstance(event, Finished):
        bar.close()
        for what, path in event.outputs.items() if rank == 0 else ():
            print(f"{what}: {path}")
        for name, value in event.metrics.items():
            print(f"{name}: {value:.4f}")
        if not event.stopped_early:
            return 0
        saved = "the embedding so far was saved" if event.outputs.get("embedding") else "nothing was saved (no step had finished)"
        if received:
            name = signal.Signals(received[0]).name
            print(f"stopped early by {name}; {saved}", file=sys.stderr)
            return 128 + received[0]
        print(f"stopped early; {saved}", file=sys.stderr)
        return 0
    elif isinstance(event, Failed):
        bar.close()
        print(f"error: {event.message}", file=sys.stderr)
        for what, path in event.outputs.items():
            print(f"kept {what}: {path}", file=sys.stderr)
        return EXIT_FAILED
    return code


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status. Ctrl-C before a run has started (while the
    libraries load, say) ends it with 130 and one line, no traceback."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        _say("interrupted")
        return 128 + signal.SIGINT


def _main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    if args.command == "demo-model":
        from .demo_model import write_demo_model, write_demo_sdxl
        from .demo_sd3_flux import write_demo_flux, write_demo_sd3

        for chosen, write, title, clips in (
            (args.sdxl, write_demo_sdxl, "SDXL", ("clip_l", "clip_g")),
            (args.sd3, write_demo_sd3, "SD 3", ("clip_l", "clip_g")),
            (args.flux, write_demo_flux, "Flux", ("clip_l",)),
        ):
            if chosen:
                out = Path(write(args.dir))
                print(f"{title} demo model written: {out / 'sd'} and {' and '.join(str(out / clip) for clip in clips)}")
                return 0
        out = write_demo_model(args.dir, prediction_type="v_prediction" if args.v_prediction else "epsilon")
        print(f"demo model written: {Path(out) / 'sd'} and {Path(out) / 'clip'}")
        return 0
    if args.command == "convert":
        from .data import ImageError, open_image
        from .formats import EmbeddingFormatError, convert

        from .engine import explain_failure

        try:
            if len(args.input) > 2:
                raise EmbeddingFormatError("give one embedding file, or the two files of diffusers' SDXL output")
            picture = open_image(args.picture) if args.picture else None
            path = convert(args.input[0], args.format, args.output, args.token, second=(args.input[1:] or [None])[0], picture=picture)
        except (EmbeddingFormatError, ImageError, OSError) as error:  # OSError: the output cannot be written
            print(f"error: {explain_failure(error)}", file=sys.stderr)
            return 2
        print(f"{args.format}: {path}")
        return 0
    if args.command == "evaluate":
        return _run_job(lambda engine: engine.evaluate(eval_settings_from_args(args)))
    if args.command == "train":
        return _run_job(lambda engine: engine.train(settings_from_args(args)), args.log_jsonl)
    if args.command == "optimize-prompt":
        return _run_job(lambda engine: engine.optimize_prompt(prompt_settings_from_args(args)), args.log_jsonl)
    if args.command == "generate":
        return _generate(args)
    return 2


def prompt_settings_from_args(args):
    from .settings import PromptSettings

    return PromptSettings(
        images=args.image,
        image_weights=args.image_weight,
        output_dir=args.output,
        model=args.model,
        clip_model=args.clip_model,
        clip_model_g=args.clip_model_g,
        prompt=args.prompt,
        anchor=args.anchor,
        anchor_weight=args.anchor_weight,
        negative=args.negative,
        length=args.length,
        hard=args.hard,
        steps=args.steps,
        lr=args.lr,
        seed=args.seed,
        device=args.device,
        precision=args.precision,
    )


def _generate(args) -> int:
    from .device import choose_placement
    from .engine import explain_failure
    from .files import atomic_save_image
    from .generate import generate, parse_size
    from .models import ModelStore

    if (args.prompt is None) == (args.prompt_embeds is None):
        print("error: give --prompt or --prompt-embeds (one of them)", file=sys.stderr)
        return 2
    try:
        size = parse_size(args.size) if args.size else None  # before the slow load
        placement = choose_placement(args.device, args.precision)
        pipe = ModelStore().pipeline(args.model, placement)
        images = generate(
            pipe,
            prompt=args.prompt,
            negative=args.negative,
            embeddings=args.embedding,
            prompt_embeds=args.prompt_embeds,
            steps=args.steps,
            guidance=args.guidance,
            seed=args.seed,
            size=size,
            placement=placement,
        )
        output = atomic_save_image(images[0], args.output)  # a full disk never leaves half a picture
    except Exception as error:  # noqa: BLE001 - one readable line, as for engine jobs
        print(f"error: {explain_failure(error)}", file=sys.stderr)
        return 2
    print(f"image: {output}")
    return 0
