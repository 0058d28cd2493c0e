"""The engine: runs jobs one at a time on a background thread and streams their events.

Everything that drives training, evaluation, prompt search or generation (the CLI, the app,
the tests) submits a job and reads its events; nothing here knows about Gradio or terminals.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import queue
import threading
import traceback
from collections.abc import Callable, Iterator

from .events import (
    TERMINAL_EVENTS,
    Event,
    Failed,
    Finished,
    Log,
    Progress,
    Reporter,
    Started,
)
from .models import ModelStore, reporting_downloads

log = logging.getLogger(__name__)
_ids = itertools.count(1)


def explain_failure(error: BaseException) -> str:
    """One paragraph a person can act on, for any error a job can raise. It says nothing of what
    was saved: the job adds that, knowing what it saved."""
    from .data import ImageError
    from .embeddings import TokenError
    from .models import ModelLoadError
    from .settings import SettingsError
    from .training import TrainingDiverged

    if isinstance(error, (ImageError, TokenError, ModelLoadError, SettingsError, TrainingDiverged)):
        return str(error)
    if _is_out_of_memory(error):
        return (
            "ran out of memory. Try a smaller batch size, a lower resolution, or gradient checkpointing; "
            "close other programs using the GPU."
        )
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        where = f" while writing {error.filename}" if error.filename else ""
        return f"the disk is full{where}. Free some space, or write somewhere else, and try again."
    if isinstance(error, OSError) and error.errno in (errno.EROFS, errno.EACCES, errno.EPERM) and error.filename:
        return f"cannot write {error.filename}: {error.strerror.lower()}. Choose a folder you can write to."
    if isinstance(error, (ValueError, FileNotFoundError, PermissionError)):
        return str(error)
    return f"unexpected error ({type(error).__name__}: {error}); see the log for details."


def what_was_kept(outputs: dict[str, str]) -> str:
    """The sentence a failure message ends with: the embedding it kept, if any was saved."""
    return " The last good embedding was kept." if outputs.get("embedding") else ""


def _is_out_of_memory(error: BaseException) -> bool:
    import torch

    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


class Job:
    """A submitted piece of work and the events it has sent so far."""

    def __init__(self, description: str, work: Callable[[Reporter], dict], total_steps: int):
        self.id = f"job-{next(_ids)}"
        self.description = description
        self.total_steps = total_steps
        self._work = work
        self._stop = threading.Event()
        self._queue: queue.Queue[Event] = queue.Queue()
        self._lock = threading.Lock()
        self.history: list[Event] = []
        self.status = "queued"  # queued, running, finished, failed
        self.time_limit_s: float | None = None  # set by the engine: the longest the job may run
        self.reporter: Reporter | None = None
        self.outputs: dict[str, str] = {}

    def cancel(self) -> None:
        """Ask the job to stop; it finishes the current step, saves, and ends."""
        self._stop.set()

    @property
    def cancelled(self) -> bool:
        return self._stop.is_set()

    @property
    def done(self) -> bool:
        return self.status in ("finished", "failed")

    def _emit(self, event: Event) -> None:
        with self._lock:
            self.history.append(event)
        self._queue.put(event)

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Yield events as they come, ending after the finished or failed event.

        With a timeout, yields None when nothing arrived within it (so a UI can refresh)."""
        while True:
            try:
                event = self._queue.get(timeout=timeout)
            except queue.Empty:
                yield None
                continue
            yield event
            if isinstance(event, TERMINAL_EVENTS):
                return

    def wait(self) -> Event:
        """Block until the job ends; returns its finished or failed event."""
        last = None
        for event in self.events():
            last = event
        return last

    def _run(self) -> None:
        self.status = "running"
        reporter = Reporter(self._emit, self._stop, self.total_steps)
        reporter.limit_time(self.time_limit_s)
        self.reporter = reporter
        self._emit(Started(self.id, self.description, self.total_steps))
        failure = None
        try:
            with reporting_downloads(reporter.log):
                outputs = self._work(reporter)
        except BaseException as error:  # noqa: BLE001 - every failure becomes an event
            log.debug("job %s failed", self.id, exc_info=True)
            self._emit(Log("".join(traceback.format_exception_only(type(error), error)).strip()))
            failure = explain_failure(error)
        # Announced only once the failed work's frames (and the models, tensors... they held) are
        # gone: whoever reads the event may end the process at once.
        if failure is not None:
            self.outputs = dict(reporter.outputs)
            self.status = "failed"
            self._emit(Failed(failure + what_was_kept(self.outputs), self.outputs))
            return
        self.outputs = dict(outputs)
        self.status = "finished"
        self._emit(Finished(self.outputs, stopped_early=self._stop.is_set(), metrics=dict(reporter.metrics)))


class Engine:
    """Runs submitted jobs one at a time, in order, on one background thread.

    The thread belongs to the process that started it. A forked process (ZeroGPU runs each
    GPU call in a fork of the server) has no such thread, so the first job submitted there
    starts the forked process's own thread and queue."""

    def __init__(self, store: ModelStore | None = None):
        self.store = store or ModelStore()
        # The longest a job may run (a shared server's setting): past it, the job stops as if
        # Stop were pressed, keeping what it saved. None: no limit.
        self.time_limit_s: float | None = None
        self._start_worker()

    def _start_worker(self) -> None:
        self._pid = os.getpid()
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._waiting: list[Job] = []
        self._lock = threading.Lock()
        self.current: Job | None = None
        self._thread = threading.Thread(target=self._loop, name="tinv-engine", daemon=True)
        self._thread.start()

    def submit(self, description: str, work: Callable[[Reporter], dict], total_steps: int = 0) -> Job:
        """Queue `work(reporter) -> outputs`; returns its Job at once."""
        if os.getpid() != self._pid:  # forked: the parent's thread (and what it held) is not here
            self._start_worker()
        job = Job(description, work, total_steps)
        job.time_limit_s = self.time_limit_s
        with self._lock:
            self._waiting.append(job)
        self._jobs.put(job)
        return job

    def position(self, job: Job) -> int:
        """0 when running or done, else how many jobs run before it."""
        with self._lock:
            if job not in self._waiting:
                return 0
            return self._waiting.index(job) + (1 if self.current is not None else 0)

    def expected_wait(self, job: Job) -> float | None:
        """Seconds until `job` should start, roughly: what the running job has left (its own
        estimate) plus the steps of the jobs queued before `job` at the running job's speed.
        None while nothing is known yet (the running job has not finished a step)."""
        with self._lock:
            if job not in self._waiting or self.current is None:
                return None
            ahead = self._waiting[: self._waiting.index(job)]
            progress = [e for e in list(self.current.history) if isinstance(e, Progress)]
        if not progress or progress[-1].eta_s is None:
            return None
        last = progress[-1]
        per_step = last.elapsed_s / max(last.step, 1)
        return last.eta_s + sum(other.total_steps for other in ahead) * per_step

    def _check_model_names(self, settings) -> None:
        """On a shared server (the store takes Hub ids only), every setting naming a model is
        checked before the job is queued, whichever loader would read it."""
        from .models import MODEL_FIELDS, SHARED_MODELS_ONLY, is_hub_name
        from .settings import SettingsError

        if self.store.hub_only:
            for field in MODEL_FIELDS:
                if getattr(settings, field, None) and not is_hub_name(getattr(settings, field)):
                    raise SettingsError(field, SHARED_MODELS_ONLY)

    def train(self, settings, export: bool = False) -> Job:
        """Queue a training job. Settings are checked now, so bad values fail before queueing.
        With `export`, the job also writes the embedding for every other tool when it ends."""
        from .jobs import (
            check_output_folder,
            describe,
            run_training,
            run_training_and_export,
        )

        resolved = settings.resolved()
        self._check_model_names(resolved)
        check_output_folder(resolved.output_dir)
        run = run_training_and_export if export else run_training
        return self.submit(describe(resolved), lambda reporter: run(resolved, self.store, reporter), resolved.total_steps)

    def evaluate(self, settings) -> Job:
        """Queue an evaluation job (tinv_gui.evaluate.EvalSettings); checked before queueing."""
        from .jobs import run_evaluation

        settings.check()
        self._check_model_names(settings)
        description = f"evaluation of {settings.embedding} on {settings.model}"
        return self.submit(description, lambda reporter: run_evaluation(settings, self.store, reporter), settings.total_steps)

    def generate(self, settings) -> Job:
        """Queue a generation job (tinv_gui.generate.GenerateSettings); checked before queueing."""
        from .jobs import run_generation

        settings.check()
        self._check_model_names(settings)
        what = repr(settings.prompt) if settings.prompt is not None else "a saved prompt"
        return self.submit(f"generate {what} on {settings.model}", lambda reporter: run_generation(settings, self.store, reporter))

    def optimize_prompt(self, settings) -> Job:
        """Queue a prompt-from-image job (PromptSettings); settings are checked now."""
        from .jobs import check_output_folder, run_prompt_optimization

        resolved = settings.resolved()
        self._check_model_names(resolved)
        check_output_folder(resolved.output_dir)
        description = f"{resolved.mode} prompt optimization on {resolved.model}"
        return self.submit(description, lambda reporter: run_prompt_optimization(resolved, self.store, reporter), resolved.total_steps)

    def close(self) -> None:
        """Stop every job, queued or running, and wait for the engine's thread to end.

        A process should call this before it exits: a thread still inside PyTorch when the
        interpreter shuts down aborts the process ("terminate called without an active exception")."""
        if os.getpid() != self._pid or not self._thread.is_alive():
            return
        with self._lock:
            for job in [*self._waiting, self.current]:
                if job is not None:
                    job.cancel()
        self._jobs.put(None)
        self._thread.join()

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:  # close() was called
                return
            with self._lock:
                self._waiting.remove(job)
                self.current = job
            try:
                if job.cancelled:  # stopped while waiting: nothing to run
                    job.status = "finished"
                    job._emit(Finished({}, stopped_early=True))
                else:
                    job._run()
            finally:
                with self._lock:
                    self.current = None
