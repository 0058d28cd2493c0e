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
    p.add_argument(
        "input", nargs="+", help="an embedding file in any layout (diffusers, A1111 .pt/.safetensors/.png, kohya, OneTrainer, "
        "a LoRA with an embedding); for diffusers' SDXL output, its two files (learned_embeds, learned_embeds_2)"
    )
    p.add_argument("--picture", default=None, help="a1111-png: the card's preview picture (default: a plain one with the name)")
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
    shape = demo.add_mutually_exclusive_group()
    shape.add_argument("--sdxl", action="store_true", help="SDXL-shaped instead: DIR/sd, DIR/clip_l and DIR/clip_g")
    shape.add_argument("--sd3", action="store_true", help="SD 3.5-shaped instead (CLIP-L, bigG, T5): DIR/sd, DIR/clip_l and DIR/clip_g")
    shape.add_argument("--flux", action="store_true", help="Flux.1-dev-shaped instead (CLIP-L, T5): DIR/sd and DIR/clip_l")
    return parser


def _settings(cls, args):
    """The settings of a command from its flags (tinv_gui.schema makes both from the same fields)."""
    from .schema import from_args

    return from_args(cls, args)


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

    # A Ctrl-C while the libraries loaded that one of them swallowed (C code that clears any
    # Python error it meets) still stops the run, at once.
    received: list[int] = list(_SIGNALS_BEFORE_THE_RUN)
    if received:
        job.cancel()

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
            code = _exit_status(event, received, code)
            try:
                _show(event, bar, step_log, prefix, rank, received)
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


def _exit_status(event, received: list[int], code: int) -> int:
    """The exit status once `event` has come: 0 finished, 2 failed, 128 + the signal's number
    when a signal stopped the run early."""
    from .events import Failed, Finished

    if isinstance(event, Finished):
        return 128 + received[0] if event.stopped_early and received else 0
    return EXIT_FAILED if isinstance(event, Failed) else code


def _show(event, bar, step_log: _StepLog, prefix: str, rank: int, received: list[int]) -> None:
    """Show one event of `follow` in the terminal."""
    from .events import Failed, Finished, Log, Preview, Progress

    if isinstance(event, Progress):
        step_log.write({k: v for k, v in event.to_dict().items() if k != "event"})  # first: the terminal may fail
        bar.total = event.total
        bar.update(event.step - bar.n)
        bar.set_postfix(loss=f"{event.loss:.4f}", phase=event.phase)
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
            return
        saved = "the embedding so far was saved" if event.outputs.get("embedding") else "nothing was saved (no step had finished)"
        if received:
            name = signal.Signals(received[0]).name
            print(f"stopped early by {name}; {saved}", file=sys.stderr)
            return
        print(f"stopped early; {saved}", file=sys.stderr)
    elif isinstance(event, Failed):
        bar.close()
        print(f"error: {event.message}", file=sys.stderr)
        for what, path in event.outputs.items():
            print(f"kept {what}: {path}", file=sys.stderr)


# Ctrl-Cs received before `follow` took the signals over.
_SIGNALS_BEFORE_THE_RUN: list[int] = []


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status. Ctrl-C before a run has started (while the
    libraries load, say) ends it with 130 and one line, no traceback."""
    def interrupt(signum, frame):  # noqa: ARG001
        _SIGNALS_BEFORE_THE_RUN.append(signum)
        raise KeyboardInterrupt

    _SIGNALS_BEFORE_THE_RUN.clear()
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.default_int_handler:  # not ignored, and not a caller's own handler
        signal.signal(signal.SIGINT, interrupt)
    try:
        return _main(argv)
    except KeyboardInterrupt:
        _say("interrupted")
        return 128 + signal.SIGINT
    finally:
        if previous is signal.default_int_handler:
            signal.signal(signal.SIGINT, previous)


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
        from .engine import explain_failure
        from .formats import EmbeddingFormatError, convert

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
