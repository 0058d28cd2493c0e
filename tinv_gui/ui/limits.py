"""A shared server's limits on each visitor's generations, measurements and prompt searches.

Those calls wait in the engine's queue, one job at a time for everyone, in the order they came.
A visitor who sent a hundred at once would hold that queue (and the CPU or GPU) for everyone
after them; so each visitor may have only a few waiting or running at once, and may start only
so many in a time window. A call past either limit is refused at once, with a message naming
the limit and when to try again. (Training has its own: one run per visitor, capped in steps
and time; see tab_train.py.)
"""

from __future__ import annotations

import functools
import inspect
import threading
import time
from collections import Counter, deque
from collections.abc import Callable

import gradio as gr

from .gpu import ZERO_GPU
from .host import host_number

# How the limited handlers queue: in the engine's queue, so a visitor's calls are counted (and
# refused past a limit) when they arrive, not when Gradio's queue gets to them; on ZeroGPU, where
# the GPU call must wait, in Gradio's, one at a time.
QUEUE = dict(concurrency_id="gpu", concurrency_limit=1) if ZERO_GPU else dict(concurrency_id="engine", concurrency_limit=None)


def _duration(seconds: float) -> str:
    """`seconds` as a person would say it: "40 s", "3 min", "1 min 20 s"."""
    seconds = max(1, round(seconds))
    minutes, rest = divmod(seconds, 60)
    if not minutes:
        return f"{rest} s"
    return f"{minutes} min" + (f" {rest} s" if rest else "")


class VisitorLimits:
    """How many calls each visitor may have in flight at once, and start per time window.

    `admit(key)` is a context manager held while the call waits and runs; it raises gr.Error
    (and counts nothing) when the visitor is past a limit. The table forgets visitors with
    nothing in flight and no call within the window, so it stays as small as the active crowd."""

    def __init__(self, at_once: int, per_window: int, window_s: float, clock: Callable[[], float] = time.monotonic):
        self.at_once, self.per_window, self.window_s = at_once, per_window, window_s
        self.clock = clock
        self._lock = threading.Lock()
        self._started: dict[str, deque[float]] = {}  # visitor key -> when their admitted calls started
        self._in_flight: Counter[str] = Counter()

    @classmethod
    def from_env(cls) -> VisitorLimits:
        """The limits a host set (README, Spaces), else defaults that suit a Space; a value that
        is not one they take (0 would refuse every call) is refused by host_number, naming it."""
        return cls(
            at_once=host_number("TINV_GUI_VISITOR_AT_ONCE"),
            per_window=host_number("TINV_GUI_VISITOR_CALLS"),
            window_s=host_number("TINV_GUI_VISITOR_WINDOW_MINUTES") * 60,
        )

    def _refusal(self, key: str, now: float) -> str | None:
        started = self._started.setdefault(key, deque())
        while started and started[0] <= now - self.window_s:
            started.popleft()
        if self._in_flight[key] >= self.at_once:
            return (
                f"You already have {self._in_flight[key]} generation(s), measurement(s) or prompt search(es) waiting or "
                f"running; this shared server takes at most {self.at_once} at once from each visitor. Try again when one ends."
            )
        if len(started) >= self.per_window:
            return (
                f"This shared server takes at most {self.per_window} generations, measurements and prompt searches from each "
                f"visitor every {_duration(self.window_s)}. Try again in {_duration(started[0] + self.window_s - now)}."
            )
        return None

    def _forget_idle(self, now: float) -> None:
        for key in [k for k, started in self._started.items() if not self._in_flight[k] and (not started or started[-1] <= now - self.window_s)]:
            del self._started[key]
            del self._in_flight[key]

    def take(self, key: str) -> None:
        """Count one call of `key` as started and in flight; gr.Error when past a limit."""
        with self._lock:
            now = self.clock()
            self._forget_idle(now)
            refusal = self._refusal(key, now)
            if refusal:
                raise gr.Error(refusal, title="Limit reached", print_exception=False)
            self._started[key].append(now)
            self._in_flight[key] += 1

    def release(self, key: str) -> None:
        """The call of `key` ended (finished, failed or its page closed)."""
        with self._lock:
            self._in_flight[key] = max(self._in_flight[key] - 1, 0)

    def wrap(self, fn: Callable, key_of: Callable[[gr.Request], str]) -> Callable:
        """`fn` (a Gradio handler taking a gr.Request) counted against its visitor's limits while it
        waits and runs. Gradio sees fn's own signature (functools.wraps), so it still passes the request."""

        def visitor(args, kwargs) -> str:
            request = next((a for a in (*args, *kwargs.values()) if isinstance(a, gr.Request)), None)
            return key_of(request)

        if inspect.isgeneratorfunction(fn):
            @functools.wraps(fn)
            def following(*args, **kwargs):
                key = visitor(args, kwargs)
                self.take(key)
                try:
                    yield from fn(*args, **kwargs)
                finally:
                    self.release(key)

            return following

        @functools.wraps(fn)
        def once(*args, **kwargs):
            key = visitor(args, kwargs)
            self.take(key)
            try:
                return fn(*args, **kwargs)
            finally:
                self.release(key)

        return once
