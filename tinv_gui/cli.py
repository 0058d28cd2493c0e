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


def _method_defaults_note(name: str) -> str:
    """Where a setting left unset takes its value: each method's published default."""
    from .methods import METHODS

    values = {m.name: m.defaults[name] for m in METHODS.values() if name in m.defaults}
    return ", ".join(f"{value} for {method}" for method, value in values.items())


def _add_train(sub) -> None:
    from .schema import add_arguments
    from .settings import TrainSettings

    p = sub.add_parser("train", help="learn a new token from pictures")
    add_arguments(p, TrainSettings, _method_defaults_note)


def _add_convert(sub) -> None:
    from .formats import FORMATS

    p = sub.add_parser("convert", help="rewrite an embedding file for another tool")
    p.add_argument("input", help="an embedding file in any layout (diffusers, A1111 .pt/.safetensors, kohya)")
    p.add_argument("--format", required=True, choices=tuple(FORMATS), help="; ".join(f"{k}: {v}" for k, v in FORMATS.items()))
    p.add_argument("--output", required=True, help="the file to write, or a folder to write the format's usual file name into")
    p.add_argument("--token", default=None, help="rename the embedding (default: the name the file holds)")


def _add_evaluate(sub) -> None:
    from .schema import add_arguments
    from .settings import EvalSettings

    p = sub.add_parser("evaluate", help="score an embedding: CLIP image and text similarity, against its initializer word")
    add_arguments(p, EvalSettings)


def _add_optimize_prompt(sub) -> None:
    from .schema import add_arguments
    from .settings import PromptSettings

    p = sub.add_parser("optimize-prompt", help="find the prompt that describes a picture (continuous, or readable with --hard)")
    add_arguments(p, PromptSettings)


def _add_generate(sub) -> None:
    from .schema import add_arguments
    from .settings import GenerateSettings

    p = sub.add_parser("generate", help="make a picture with learned embeddings or optimized prompt embeddings")
    add_arguments(p, GenerateSettings)


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
    demo.add_argument("--sdxl", action="store_true", help="SDXL-shaped instead: DIR/sd, DIR/clip_l and DIR/clip_g")
    return parser


def _settings(cls, args):
    """The settings of a command from its flags (tinv_gui.schema makes both from the same fields)."""
    from .schema import from_args

    return from_args(cls, args)


def _run_job(submit, log_jsonl: str | None = None) -> int:
    """Submit a job to a new engine and follow it; bad settings end it before it is queued."""
    from .engine import Engine
    from .settings import SettingsError

    try:
        job = submit(Engine())
    except SettingsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return follow(job, log_jsonl)


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

    # Under `accelerate launch`, only the main process draws the bar, writes the log and lists
    # outputs; the others print their log lines with their number.
    from .distributed import launched_with_several_processes

    rank = int(os.environ.get("RANK", "0")) if launched_with_several_processes() else 0
    prefix = f"[process {rank + 1}] " if rank else ""
    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    bar = tqdm(total=job.total_steps or None, unit="step", dynamic_ncols=True, file=sys.stderr, disable=rank > 0)
    log_file = open(log_jsonl, "w", encoding="utf-8") if log_jsonl and rank == 0 else None
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
                bar.write(prefix + event.message, file=sys.stderr)
            elif isinstance(event, Preview):
                bar.write(f"preview at step {event.step}: {event.path}", file=sys.stderr)
            elif isinstance(event, Finished):
                bar.close()
                for what, path in event.outputs.items() if rank == 0 else ():
                    print(f"{what}: {path}")
                for name, value in event.metrics.items():
                    print(f"{name}: {value:.4f}")
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
        from .demo_model import write_demo_model, write_demo_sdxl

        if args.sdxl:
            out = write_demo_sdxl(args.dir)
            print(f"SDXL demo model written: {Path(out) / 'sd'}, {Path(out) / 'clip_l'} and {Path(out) / 'clip_g'}")
            return 0
        out = write_demo_model(args.dir, prediction_type="v_prediction" if args.v_prediction else "epsilon")
        print(f"demo model written: {Path(out) / 'sd'} and {Path(out) / 'clip'}")
        return 0
    if args.command == "convert":
        from .formats import EmbeddingFormatError, convert

        try:
            path = convert(args.input, args.format, args.output, args.token)
        except (EmbeddingFormatError, OSError) as error:  # OSError: the output cannot be written
            print(f"error: {error}", file=sys.stderr)
            return 2
        print(f"{args.format}: {path}")
        return 0
    from .settings import EvalSettings, PromptSettings, TrainSettings

    if args.command == "evaluate":
        return _run_job(lambda engine: engine.evaluate(_settings(EvalSettings, args)))
    if args.command == "train":
        return _run_job(lambda engine: engine.train(_settings(TrainSettings, args)), args.log_jsonl)
    if args.command == "optimize-prompt":
        return _run_job(lambda engine: engine.optimize_prompt(_settings(PromptSettings, args)), args.log_jsonl)
    if args.command == "generate":
        return _generate(args)
    return 2


def _generate(args) -> int:
    """Draw through the engine, as the app does; every value is checked before anything loads."""
    from .settings import GenerateSettings

    return _run_job(lambda engine: engine.generate(_settings(GenerateSettings, args)))
