"""Logging a training run to TensorBoard and Weights & Biases, through accelerate's trackers.

The trackers follow the job's events, as the app and the command line do: each step's loss and
learning rate, the learned vectors' norms, the previews and the checkpoints' scores. A
tracker that cannot start or write (not installed, not logged in, a full disk) is given up with
one line in the log; it never stops the run.
"""

from __future__ import annotations

import time
from pathlib import Path

from .events import CheckpointScore, Event, Preview, Progress, Reporter, VectorNorms

TRACKERS = {"tensorboard": ("tensorboard",), "wandb": ("wandb",), "both": ("tensorboard", "wandb"), "none": ()}
LOG_FOLDER = "logs"  # TensorBoard's files, in the output folder: tensorboard --logdir OUTPUT/logs
INSTALL = {"tensorboard": "pip install tensorboard", "wandb": "pip install wandb, then wandb login"}
# What add_images needs to read a picture as [count, height, width, channels] (W&B takes it as is).
IMAGE_OPTIONS = {"tensorboard": dict(dataformats="NHWC")}


class RunTrackers:
    """The trackers of one run; `on_event` logs what an event carries to each of them."""

    def __init__(self, trackers: list, reporter: Reporter):
        self.trackers = trackers
        self.reporter = reporter

    @classmethod
    def start(cls, log_with: str, output_dir, run_name: str, config: dict, reporter: Reporter) -> RunTrackers:
        """Start the trackers `log_with` names (a TRACKERS key), writing TensorBoard's files to
        `output_dir`/logs/`run_name`-(time), a folder of the run's own (new_run_folder); only the
        main process of a distributed run logs."""
        started = []
        if reporter.process is not None and not reporter.process.is_main:
            return cls(started, reporter)
        log_folder = Path(output_dir) / LOG_FOLDER
        run = f"{run_name}-{time.strftime('%Y%m%d-%H%M%S')}"
        for name in TRACKERS[log_with]:
            try:
                if name == "tensorboard":  # W&B (after it) names the run the same
                    run = new_run_folder(log_folder, run).name
                tracker = _make(name, run, log_folder, config)
            except Exception as error:  # noqa: BLE001 - a missing or failing logger must not cost the run
                reporter.log(f"not logging to {name} ({type(error).__name__}: {error}); {INSTALL[name]} to use it")
                continue
            started.append(tracker)
            where = f" in {tracker.logging_dir}" if name == "tensorboard" else ""
            reporter.log(f"logging to {name}{where}")
        return cls(started, reporter)

    def on_event(self, event: Event) -> None:
        """Log what `event` carries (a step's loss and learning rate, the vectors' norms, a
        checkpoint's scores, a preview picture) to every tracker still logging."""
        if not self.trackers:  # none asked for, or all given up: not even a preview to read
            return
        if isinstance(event, Progress):
            self._each("log", {"loss": event.loss, "lr": event.lr}, event.step)
        elif isinstance(event, VectorNorms):
            norms = {f"norm/{encoder}/{i}": value for encoder, values in event.norms.items() for i, value in enumerate(values)}
            self._each("log", norms, event.step)
        elif isinstance(event, CheckpointScore):
            scores = {"checkpoint/image_similarity": event.image_similarity, "checkpoint/text_similarity": event.text_similarity}
            self._each("log", scores, event.step)
        elif isinstance(event, Preview):
            import numpy as np
            from PIL import Image

            try:
                with Image.open(event.path) as picture:
                    pixels = np.asarray(picture.convert("RGB"))[None]
            except OSError as error:  # the preview is the page's; the trackers can do without it
                self.reporter.log(f"preview {event.path} not logged ({error})")
                return
            self._each("log_images", {f"preview/{event.prompt}": pixels}, event.step)

    def _each(self, method: str, values: dict, step: int) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(values, step=step, **(IMAGE_OPTIONS.get(tracker.name, {}) if method == "log_images" else {}))
            except Exception as error:  # noqa: BLE001 - logging is given up, never the run
                self.trackers.remove(tracker)
                self.reporter.log(f"stopped logging to {tracker.name} ({type(error).__name__}: {error}); training goes on")

    def finish(self) -> None:
        """Close every tracker (flushing what it holds); a tracker that fails to close is left be."""
        for tracker in self.trackers:
            try:
                tracker.finish()
            except Exception:  # noqa: BLE001, S110 - the run's own result matters more than closing a log
                pass
        self.trackers = []


def new_run_folder(log_folder: Path, run: str) -> Path:
    """A new, empty `log_folder`/`run`, or `run`-2, `run`-3, ... when that is taken: two runs
    started within the same second (two visitors, two commands) would otherwise write into
    one folder, and TensorBoard would draw their curves as one. Made at once, so it is taken
    by whoever gets there first, however many processes ask."""
    log_folder.mkdir(parents=True, exist_ok=True)
    folder, n = log_folder / run, 1
    while True:
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            n += 1
            folder = log_folder / f"{run}-{n}"


def _make(name: str, run: str, log_folder: Path, config: dict):
    """An accelerate tracker, started, with the run's settings `config` recorded (TensorBoard's
    HPARAMS, W&B's config)."""
    from accelerate import tracking

    if name == "tensorboard":
        if not tracking.is_tensorboard_available():
            raise ModuleNotFoundError("the tensorboard package is not installed")
        tracker = tracking.TensorBoardTracker(run, str(log_folder))
    else:
        if not tracking.is_wandb_available():
            raise ModuleNotFoundError("the wandb package is not installed")
        tracker = tracking.WandBTracker("tinv-gui", name=run)
    if hasattr(tracker, "start"):  # accelerate >= 1.x opens the writer here; earlier ones did in __init__
        tracker.start()
    tracker.store_init_configuration(config)  # the run's settings, as Accelerator.init_trackers records them
    return tracker
