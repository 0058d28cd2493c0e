"""ZeroGPU: handlers that use the GPU run under `spaces.GPU` when the `spaces` package is there."""

from __future__ import annotations

import functools
import inspect
import os

import gradio as gr

from .host import host_number

MAX_GPU_DURATION_S = host_number("TINV_GUI_MAX_GPU_SECONDS")  # ZeroGPU's longest call
# On ZeroGPU Spaces every GPU call runs in a fork of the server, which holds the GPU only while
# the call lasts: a job must start, run and end inside the call that started it.
ZERO_GPU = os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")


def on_gpu(fn, duration=120, outputs: list | None = None):
    """`fn` under ZeroGPU's `spaces.GPU` when the `spaces` package is installed; as is otherwise.

    `duration` is seconds, or a function of fn's arguments giving them. ZeroGPU sends every result
    from the GPU process to the server pickled, where a dict keyed by components would arrive as
    copies Gradio does not know: with `outputs`, such dicts are sent as a list in that order."""
    try:
        import spaces
    except ImportError:
        return fn
    if outputs is not None:
        fn = _results_as_lists(fn, outputs)
    return spaces.GPU(duration=duration)(fn)


def _results_as_lists(fn, outputs: list):
    def as_list(result):
        return [result.get(component, gr.skip()) for component in outputs] if isinstance(result, dict) else result

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def following(*args, **kwargs):
            for result in fn(*args, **kwargs):
                yield as_list(result)

        return following

    @functools.wraps(fn)
    def once(*args, **kwargs):
        return as_list(fn(*args, **kwargs))

    return once

