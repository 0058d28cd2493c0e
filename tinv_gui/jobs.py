"""Jobs: what runs on the engine's thread. A job loads what it needs (through the ModelStore,
so models stay warm), prepares the data, calls a method, and returns its output files."""

from __future__ import annotations

from pathlib import Path

from .data import load_dataset
from .device import choose_placement, return_freed_memory_promptly
from .events import Reporter
from .models import ModelStore
from .settings import DIFFUSION_METHODS, TrainSettings
from .training import EmbeddingWriter


def describe(settings: TrainSettings) -> str:
    return f"{settings.method} training of {settings.token!r} on {settings.model}"


def run_training(settings: TrainSettings, store: ModelStore, reporter: Reporter) -> dict[str, str]:
    """Train as `settings` (resolved) say; returns {"embedding": path, ...}."""
    placement = choose_placement(settings.device, settings.precision)
    reporter.log(f"Device: {placement.describe()}")
    metadata = {"base_model": settings.model, "method": settings.method, "init": settings.init}
    writer = EmbeddingWriter(Path(settings.output_dir), settings.token.strip(), settings.save_every, metadata, reporter)
    reporter.outputs = writer.outputs  # the engine reports what was saved, even on failure

    if settings.method == "quick":
        from .methods.quick import train_quick

        clip, images = _clip_and_pictures(settings, store, placement, reporter, writer)
        train_quick(clip, images, settings, reporter, writer)
        return dict(writer.outputs)
    if settings.method in DIFFUSION_METHODS:
        from .methods import textual_inversion as ti

        return_freed_memory_promptly()
        reporter.log(f"Loading {settings.model}")
        pipe = store.pipeline(settings.model, placement)
        size = settings.resolution or ti.native_resolution(pipe)
        images = load_dataset(settings.images, size=size)
        reporter.log(f"{len(images)} pictures ready at {size}x{size}")
        if settings.method == "textual-inversion":
            ti.train_textual_inversion(pipe, placement, images, settings, reporter, writer)
        elif settings.method == "quick-then-ti":
            clip, clip_images = _clip_and_pictures(settings, store, placement, reporter, writer)
            ti.train_quick_then_ti(clip, clip_images, pipe, placement, images, settings, reporter, writer)
        else:
            from .methods.caption_init import train_caption_init

            train_caption_init(pipe, placement, images, settings, reporter, writer)
        return dict(writer.outputs)
    raise ValueError(f"unknown method {settings.method!r}")


def _clip_and_pictures(settings, store, placement, reporter, writer):
    reporter.log(f"Loading the CLIP model for {settings.model}")
    clip = store.clip(settings.model, settings.clip_model, placement)
    writer.metadata["clip_model"] = clip.name
    # Load slightly above CLIP's size so the corner views have room to differ.
    images = load_dataset(settings.images, size=int(clip.image_size * 1.15) + 1, min_side=clip.image_size // 2)
    reporter.log(f"{len(images)} pictures ready for CLIP")
    return clip, images
