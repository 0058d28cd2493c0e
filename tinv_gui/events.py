"""What a running job tells the world: one set of events for the CLI, the app and the tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field


@dataclass
class Event:
    kind = "event"

    def to_dict(self) -> dict:
        return {"event": self.kind, **asdict(self)}


@dataclass
class Started(Event):
    kind = "started"
    job_id: str
    description: str
    total_steps: int


@dataclass
class Progress(Event):
    kind = "progress"
    step: int  # 1-based, counted over the whole job (all phases)
    total: int
    loss: float
    lr: float
    elapsed_s: float  # seconds since the first step began
    eta_s: float | None
    phase: str


@dataclass
class Log(Event):
    kind = "log"
    message: str


@dataclass
class Preview(Event):
    kind = "preview"
    step: int
    path: str  # a PNG on disk
    prompt: str


@dataclass
class VectorNorms(Event):
    """How long each learned vector is, beside the lengths of the model's own words (vector_norms)."""

    kind = "norms"
    step: int
    norms: dict[str, list[float]]  # per text encoder (its name): each vector's norm
    ordinary: dict[str, list[float]]  # per text encoder: [low, high], the range of its vocabulary's row norms


@dataclass
class CheckpointScore(Event):
    """A saved checkpoint's scores (checkpoint_scores): likeness and editability."""

    kind = "checkpoint_score"
    step: int
    path: str  # the checkpoint's embedding file
    image_similarity: float  # likeness: CLIP cosine of its pictures to the training pictures
    text_similarity: float  # editability: CLIP cosine of its pictures to the prompts without the word


@dataclass
class Finished(Event):
    kind = "finished"
    outputs: dict[str, str]  # what -> path
    stopped_early: bool = False
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Failed(Event):
    kind = "failed"
    message: str  # one paragraph a person can act on
    outputs: dict[str, str] = field(default_factory=dict)  # what was saved before the failure


TERMINAL_EVENTS = (Finished, Failed)


def format_minutes(seconds: float | None) -> str:
    minutes = (seconds or 0) / 60
    return f"{minutes:g} minute{'s' if minutes != 1 else ''}"


class Reporter:
    """Handed to a method: sends its events, keeps the job's clock, and says when to stop.

    `total_steps` counts every phase, so a two-phase run reports one progress scale and one
    clock; `elapsed_s` starts when the first step begins (model loading is not counted).
    """

    def __init__(self, emit: Callable[[Event], None] | None = None, stop: threading.Event | None = None, total_steps: int = 0):
        self._emit = emit or (lambda event: None)
        self._listeners: list[Callable[[Event], None]] = []
        self.stop_event = stop or threading.Event()
        self.total_steps = total_steps
        self.steps_done = 0
        self.outputs: dict[str, str] = {}  # files saved so far, reported even when the job fails
        self.metrics: dict[str, float] = {}  # figures the job measured, sent with its finished event
        self.process = None  # a distributed.ProcessInfo under `accelerate launch`; None: one process
        self._start: float | None = None
        self._steps_before_start = 0  # a resumed run's earlier steps, left out of the time estimate
        self.time_limit_s: float | None = None
        self.deadline: float | None = None  # time.monotonic() past which the job stops (limit_time)
        self.vector_watchers: list[Callable] = []  # called with the learned vectors after each step (vector_norms.NormWatch)

    def emit(self, event: Event) -> None:
        self._emit(event)
        for listener in self._listeners:
            listener(event)

    def listen(self, listener: Callable[[Event], None]) -> None:
        """Also hand every event from now on to `listener` (the run's trackers)."""
        self._listeners.append(listener)

    def log(self, message: str) -> None:
        self.emit(Log(message))

    def should_stop(self) -> bool:
        if self.deadline is not None and not self.stop_event.is_set() and time.monotonic() > self.deadline:
            self.log(f"This server lets a job run for at most {format_minutes(self.time_limit_s)}: stopping here, keeping what was saved.")
            self.stop_event.set()
        return self.stop_event.is_set()

    def limit_time(self, seconds: float | None) -> None:
        """Stop the job, as Stop would, once it has run for `seconds` (None: no limit)."""
        self.time_limit_s = seconds
        self.deadline = None if seconds is None else time.monotonic() + seconds

    def resume_at(self, steps_done: int) -> None:
        """Count `steps_done` steps as done by an earlier run that this one continues."""
        self.steps_done = self._steps_before_start = steps_done

    def step_started(self) -> None:
        if self._start is None:
            self._start = time.perf_counter()

    def vectors_updated(self, vectors) -> None:
        """After a step: show the learned vectors to whoever watches them (e.g. their norms)."""
        for watch in self.vector_watchers:
            watch(vectors)

    def step_finished(self, loss: float, lr: float, phase: str) -> Progress:
        """Count one finished step and send its progress event."""
        self.steps_done += 1
        elapsed = time.perf_counter() - (self._start or time.perf_counter())
        remaining = max(self.total_steps - self.steps_done, 0)
        timed = self.steps_done - self._steps_before_start
        eta = elapsed / timed * remaining if timed else None
        event = Progress(self.steps_done, self.total_steps, float(loss), float(lr), elapsed, eta, phase)
        self.emit(event)
        return event
