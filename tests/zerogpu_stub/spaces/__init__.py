"""A stand-in for Hugging Face's `spaces` package, for tests only, that behaves like ZeroGPU
where it matters to tinv-gui:

- each call of a `spaces.GPU` function runs in a fork of the server, which has none of the
  server's threads and whose changes to memory the server never sees;
- arguments and every result cross between the two processes pickled;
- a generator's results stream back one by one; when the server side is closed (the visitor
  left or the event was cancelled), the GPU process closes the generator at its next result;
- `duration` may be a function of the call's arguments; it is called, and must give seconds.

Only on when SPACES_ZERO_GPU is true, as the real package.
"""

from __future__ import annotations

import functools
import inspect
import multiprocessing
import os
import pickle
import queue

ZERO_GPU = os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")
CALLS_LOG = os.environ.get("ZEROGPU_STUB_LOG")  # where each call's (name, duration) is appended
_END = "__end__"
_context = multiprocessing.get_context("fork")


def GPU(task=None, *, duration=None, **_):  # noqa: N802 - the real package's name
    if task is None:
        return functools.partial(GPU, duration=duration)
    if not ZERO_GPU:
        return task
    if inspect.isgeneratorfunction(task):
        @functools.wraps(task)
        def streamed(*args, **kwargs):
            yield from _streamed(task, duration, args, kwargs)

        return streamed

    @functools.wraps(task)
    def once(*args, **kwargs):
        return _once(task, duration, args, kwargs)

    return once


def _log_call(task, duration, args, kwargs) -> None:
    seconds = duration(*args, **kwargs) if callable(duration) else duration
    if not isinstance(seconds, (int, float)) or seconds <= 0:
        raise ValueError(f"duration must give seconds, got {seconds!r}")
    if CALLS_LOG:
        with open(CALLS_LOG, "a") as log:
            log.write(f"{task.__name__} {seconds}\n")


def _in_gpu_process(task, payload: bytes, results, stop) -> None:
    args, kwargs = pickle.loads(payload)
    try:
        if inspect.isgeneratorfunction(task):
            generator = task(*args, **kwargs)
            for result in generator:
                results.put(("ok", pickle.dumps(result)))
                if stop.is_set():
                    generator.close()
                    break
        else:
            results.put(("ok", pickle.dumps(task(*args, **kwargs))))
    except BaseException as error:  # noqa: BLE001 - handed to the server, as ZeroGPU does
        results.put(("error", pickle.dumps(error)))
    results.put((_END, b""))


def _start(task, duration, args, kwargs):
    _log_call(task, duration, args, kwargs)
    payload = pickle.dumps((args, kwargs))  # what cannot be pickled cannot reach the GPU
    results, stop = _context.Queue(), _context.Event()
    process = _context.Process(target=_in_gpu_process, args=(task, payload, results, stop), daemon=True)
    process.start()
    return process, results, stop


def _next(process, results):
    while True:
        try:
            kind, data = results.get(timeout=1)
        except queue.Empty:
            if not process.is_alive():
                raise RuntimeError("the GPU process died") from None
            continue
        if kind == "error":
            raise pickle.loads(data)
        return kind, data


def _streamed(task, duration, args, kwargs):
    process, results, stop = _start(task, duration, args, kwargs)
    try:
        while True:
            kind, data = _next(process, results)
            if kind == _END:
                return
            yield pickle.loads(data)
    finally:
        stop.set()
        process.join(timeout=180)


def _once(task, duration, args, kwargs):
    process, results, _ = _start(task, duration, args, kwargs)
    try:
        kind, data = _next(process, results)
        return pickle.loads(data)
    finally:
        process.join(timeout=180)
