"""Jobs: what runs on the engine's thread. A job loads what it needs (through the ModelStore,
so models stay warm), prepares the data, calls a method, and returns its output files."""

from __future__ import annotations

from pathlib import Path

from .data import load_dataset
from .device import choose_placement
from .events import Reporter
from .models import ModelStore
from .settings import SettingsError, TrainSettings
from .training import EmbeddingWriter


def describe(settings: TrainSettings) -> str:
    return f"{settings.method} training of {settings.token!r} on {settings.model}"


def run_training(settings: TrainSettings, store: ModelStore, reporter: Reporter) -> dict[str, str]:
    """Train as `settings` (resolved) say; returns {"embedding": path, ...}."""
    placement = choose_placement(settings.device, settings.precision)
    reporter.log(f"Device: {placement.describe()}")
    metadata = {"base_model": settings.model, "method": settings.method, "init": settings.init}
    widths = store.text_widths(settings.model)  # two for SDXL: one set of vectors per text encoder
    writer = EmbeddingWriter(Path(settings.output_dir), settings.token.strip(), settings.save_every, metadata, reporter, widths)
    reporter.outputs = writer.outputs  # the engine reports what was saved, even on failure

    if settings.method == "quick":
        from .methods.quick import train_quick

        reporter.log(f"Loading the CLIP model{'s' if len(widths) > 1 else ''} for {settings.model}")
        names = (settings.clip_model, settings.clip_model_g)[: len(widths)]
        clips = [store.clip(settings.model, name, placement, encoder) for encoder, name in enumerate(names)]
        writer.metadata["clip_model"] = ", ".join(clip.name for clip in clips)
        # Load slightly above CLIP's size so the corner views have room to differ.
        size = max(clip.image_size for clip in clips)
        images = load_dataset(settings.images, size=int(size * 1.15) + 1, min_side=min(clip.image_size for clip in clips) // 2)
        reporter.log(f"{len(images)} pictures ready")
        train_quick(clips, images, settings, reporter, writer)
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

def run_prompt_optimization(settings, store: ModelStore, reporter: Reporter) -> dict[str, str]:
    """Find the prompt for some pictures as `settings` (resolved PromptSettings) say; writes the
    results and a result.json into the output folder and returns {what: path}."""
    import json

    from .data import find_images, open_image
    from .methods.prompt_from_image import optimize_prompt, save_prompt_result

    if not settings.hard and store.is_sdxl(settings.model):
        raise SettingsError("hard", "prompt embeddings are made for SD 1.x/2.x pipelines; on SDXL, find a readable prompt with --hard")
    placement = choose_placement(settings.device, settings.precision)
    reporter.log(f"Device: {placement.describe()}")
    reporter.log(f"Loading the CLIP model for {settings.model}")
    clip = store.clip(settings.model, settings.clip_model, placement)
    # The pipeline's own text encoder makes the saved prompt_embeds; a hard prompt is plain text.
    pipe = None if settings.hard else store.pipeline(settings.model, placement)
    files = find_images(settings.images)
    images = [open_image(path, min_side=clip.image_size // 2) for path in files]

    result = optimize_prompt(clip, images, settings, reporter)
    metadata = {"base_model": settings.model, "clip_model": clip.name, "steps": result.steps_done}
    outputs = save_prompt_result(result, settings.output_dir, pipe, metadata)
    reporter.outputs.update(outputs)
    reporter.metrics.update(clip_similarity=result.similarity, steps=float(result.steps_done))
    if result.loss is not None:
        reporter.metrics["loss"] = result.loss
    if result.anchor_similarity is not None:
        reporter.metrics["anchor_similarity"] = result.anchor_similarity
    if result.texts:
        reporter.log(f"prompt: {result.texts[0]}")
        if len(result.texts) > 1:
            reporter.log(f"negative prompt: {result.texts[1]}")
    reporter.log(f"CLIP similarity with the picture(s): {result.similarity:.4f}")

    texts = result.texts or []
    record = {
        "mode": settings.mode,
        **metadata,
        "images": [str(path) for path in files],
        "length": result.length,
        "prompt": texts[0] if texts else None,
        "negative_prompt": texts[1] if len(texts) > 1 else None,
        "metrics": reporter.metrics,
    }
    summary = Path(settings.output_dir) / "result.json"
    summary.write_text(json.dumps(record, indent=2), encoding="utf-8")
    return {**outputs, "result": str(summary)}
