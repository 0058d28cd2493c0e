"""Jobs: what runs on the engine's thread. A job loads what it needs (through the ModelStore,
so models stay warm), prepares the data, calls a method, and returns its output files."""

from __future__ import annotations

from pathlib import Path

from .data import load_dataset
from .device import choose_placement
from .events import Reporter
from .models import ModelStore
from .settings import TrainSettings
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

        reporter.log(f"Loading the CLIP model for {settings.model}")
        clip = store.clip(settings.model, settings.clip_model, placement)
        writer.metadata["clip_model"] = clip.name
        # Load slightly above CLIP's size so the corner views have room to differ.
        images = load_dataset(settings.images, size=int(clip.image_size * 1.15) + 1, min_side=clip.image_size // 2)
        reporter.log(f"{len(images)} pictures ready")
        train_quick(clip, images, settings, reporter, writer)
        return dict(writer.outputs)
    raise ValueError(f"unknown method {settings.method!r}")


def run_evaluation(settings, store: ModelStore, reporter: Reporter) -> dict[str, str]:
    """Score an embedding as `settings` (tinv_gui.evaluate.EvalSettings) say; the figures go to
    the finished event's metrics and, with `settings.json_path`, to a JSON file ({"json": path})."""
    import json

    from .embeddings import atomic_write
    from .evaluate import evaluate_embedding

    result = evaluate_embedding(settings, store, reporter)
    if result is None:
        reporter.log("evaluation stopped before the end; no figures")
        return {}
    reporter.metrics.update({k: v for k, v in result.items() if k.endswith("similarity")})
    if not settings.json_path:
        return {}
    text = json.dumps(result, indent=2)
    atomic_write(settings.json_path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return {"json": str(settings.json_path)}
