"""Jobs: what runs on the engine's thread (training, with or without the exports for other
tools; evaluation; prompt search; generation). A job loads what it needs (through the
ModelStore, so models stay warm), prepares the data, calls a method, and returns its output files."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .data import describe_sizes, load_dataset
from .device import choose_placement
from .distributed import ProcessInfo, device_for_process, process_info, shard
from .events import Reporter
from .files import atomic_write_text
from .methods import Loaded, method_named
from .models import ModelLoadError, ModelStore
from .settings import TrainSettings
from .tracking import RunTrackers
from .training import EmbeddingWriter


def check_output_folder(path) -> None:
    """Make sure results can be written into the folder `path` (creating it), before anything
    slow is loaded: a run that can save nothing should not start."""
    import errno
    import tempfile

    from .settings import SettingsError

    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise SettingsError("output_dir", f"{folder} is not a folder; name a folder for the results")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        reason = "the disk is full" if error.errno == errno.ENOSPC else (error.strerror or type(error).__name__).lower()
        raise SettingsError("output_dir", f"cannot write into {folder} ({reason}); choose a folder you can write to") from None


def describe(settings: TrainSettings) -> str:
    return f"{settings.method} training of {settings.token!r} on {settings.model}"


def run_training(settings: TrainSettings, store: ModelStore, reporter: Reporter) -> dict[str, str]:
    """Train as `settings` (resolved) say; returns {"embedding": path, ...}.

    Under `accelerate launch` with several processes, each process trains on its own share of
    the pictures with its own random draws, gradients are averaged, and the main process saves.
    """
    _refuse_untrained_family(store, settings.model, "training embeddings")
    process = process_info()
    reporter.process = process
    if process.distributed:
        settings = dataclasses.replace(settings, seed=settings.seed + process.rank, device=device_for_process(settings.device))
    placement = choose_placement(settings.device, settings.precision, settings.fp8_weights)
    reporter.log(f"Device: {placement.describe()}")
    family = store.family(settings.model)
    # The family, because the parts' keys alone may not tell it (see formats.FAMILY_KEY).
    metadata = {"base_model": settings.model, "family": family.name, "method": settings.method, "init": settings.init}
    widths = store.text_widths(settings.model)  # one set of vectors per text encoder, side by side
    writer = EmbeddingWriter(
        Path(settings.output_dir), settings.token.strip(), settings.save_every, metadata, reporter, widths, family.embedding_keys,
        settings.ema_decay,
    )
    reporter.outputs = writer.outputs  # the engine reports what was saved, even on failure

    method = method_named(settings.method)
    loaded = Loaded(placement)
    if "pipeline" in method.loads:
        reporter.log(f"Loading {settings.model}")
        loaded.pipe = store.pipeline(settings.model, placement)
        size = settings.resolution or family.native_resolution(loaded.pipe)
        pictures = load_dataset(settings.images, size=size, buckets=settings.aspect_buckets, repeats=settings.repeats, multiple=family.size_multiple)
        loaded.images = _own_share(pictures, process, settings, reporter)
        reporter.log(f"{len(loaded.images)} pictures ready at {describe_sizes(loaded.images)}")
    if "clip" in method.loads:
        loaded.clips, loaded.clip_images = _clips_and_pictures(settings, store, placement, reporter, writer)
        loaded.word_parts = _word_parts(settings, store)
    norms = _watch_norms(loaded, family, reporter, store, settings.model) if process.is_main else None  # the vectors are the same in every process
    scorer = None
    if settings.score_checkpoints != "off" and process.is_main:
        from .checkpoint_scores import CheckpointScorer

        scorer = CheckpointScorer(settings, store, placement, reporter)
        writer.on_saved = scorer.saved
    trackers = RunTrackers.start(settings.log_with, settings.output_dir, settings.method, tracked_settings(settings), reporter)
    reporter.listen(trackers.on_event)
    try:
        try:
            method.run(loaded, settings, reporter, writer)
        finally:  # stopped, failed or done between two measured steps: the plot ends on the saved vectors
            _finish_norms(norms, writer.outputs.get("embedding"), reporter)
        outputs = dict(writer.outputs)
        if scorer is not None and outputs.get("embedding"):
            scorer.finish(writer.checkpoints, outputs["embedding"], reporter.steps_done)
            if scorer.recommended is not None:
                outputs["recommended"] = scorer.recommended.path
                reporter.metrics["recommended_step"] = float(scorer.recommended.step)
    finally:
        trackers.finish()
    if outputs.get("embedding"):  # saved (by the main process)
        outputs["result"] = _write_run_result(settings, outputs, norms, scorer, reporter)
    return outputs


def tracked_settings(settings: TrainSettings) -> dict:
    """The settings a tracker records with the run (W&B's config): the plain values."""
    return {k: v for k, v in dataclasses.asdict(settings).items() if isinstance(v, (str, int, float, bool))}


def _watch_norms(loaded: Loaded, family, reporter: Reporter, store: ModelStore, model: str):
    """A NormWatch on the run's vectors, against the token tables of the text encoders the
    method trains through (the pipeline's, else the CLIP models' text towers: the same words,
    and T5's own table for its part)."""
    from .models import text_encoders
    from .vector_norms import NormWatch, encoder_names

    if loaded.pipe is not None:
        tables = [encoder.get_input_embeddings().weight for encoder in text_encoders(loaded.pipe)]
    else:
        clip_tables = iter(clip.model.text_model.get_input_embeddings().weight for clip in loaded.clips)
        tables = [store.word_table(model, i) if i in (loaded.word_parts or {}) else next(clip_tables) for i in range(family.text_encoder_count)]
    watch = NormWatch(tables, encoder_names(len(tables), family.embedding_keys), reporter)
    reporter.vector_watchers.append(watch)
    return watch


def _finish_norms(norms, embedding: str | None, reporter: Reporter) -> None:
    """The norms of the embedding the run saved last as the curve's last point (NormWatch.finish)."""
    if norms is None or not embedding:
        return
    from .formats import read_embedding

    try:
        final = read_embedding(embedding).joined()
    except Exception as error:  # noqa: BLE001 - the run's own outcome matters more than the plot's last point
        reporter.log(f"the saved vectors' lengths could not be measured ({type(error).__name__}: {error})")
        return
    norms.finish(final)


RESULT_FILE = "result.json"


def _write_run_result(settings: TrainSettings, outputs: dict[str, str], norms, scorer, reporter: Reporter) -> str:
    """result.json beside the embedding: what the run made and what was measured of it (the
    prompt tokens the word takes, its vectors' norms against the model's words, the scores of
    its checkpoints when they were scored)."""
    import json

    from .formats import read_embedding
    from .settings import MAX_PROMPT_LENGTH
    from .vector_norms import tokens_used_text

    embedding = read_embedding(outputs["embedding"])
    metadata, vectors = embedding.metadata, embedding.count  # the learned vectors, one prompt token each
    reporter.log(f"The embedding has {vectors} vector{'s' if vectors != 1 else ''}: {tokens_used_text(vectors)}")
    reporter.metrics["prompt_tokens"] = float(vectors)
    record = {
        "token": settings.token.strip(),
        "method": settings.method,
        "model": settings.model,
        "steps": int(metadata.get("steps", 0)),
        "prompt_tokens": {"used": vectors, "of": MAX_PROMPT_LENGTH},
        "vector_norms": norms.summary(embedding.joined()),
        "checkpoint_scores": scorer.summary() if scorer is not None else None,
        "outputs": outputs,
    }
    return str(atomic_write_text(Path(settings.output_dir) / RESULT_FILE, json.dumps(record, indent=2)))


def recommended_file(run_folder) -> Path | None:
    """The file of the checkpoint the scores recommend in a run's folder (from its result.json):
    the final embedding when the pick is the last step (its numbered copy holds the same
    vectors), else the numbered copy; None when the run was not scored or the file is gone."""
    import json

    folder = Path(run_folder)
    try:
        result = json.loads((folder / RESULT_FILE).read_text())
        pick = result["checkpoint_scores"]["recommended"]
        chosen = result["outputs"]["embedding"] if pick["step"] == result["steps"] else pick["path"]
    except (OSError, ValueError, KeyError, TypeError):  # no result, or no scores (an unscored or older run)
        return None
    path = folder / Path(chosen).name  # by name: the visitors' folders may have moved since
    return path if path.is_file() else None


# The other tools' files written beside a run's embedding, in the order the page lists them.
EXPORTS = ("diffusers-bin", "a1111-pt", "kohya", "a1111-png", "onetrainer")


def run_training_and_export(settings: TrainSettings, store: ModelStore, reporter: Reporter) -> dict[str, str]:
    """run_training, then the embedding written once for every other tool (export_for_other_tools).
    A run that fails or is stopped has the embedding it kept exported too."""
    try:
        outputs = run_training(settings, store, reporter)
    except BaseException:
        kept = reporter.outputs.get("embedding")
        if kept:
            try:
                reporter.outputs.update(export_for_other_tools(kept))
            except Exception as error:  # noqa: BLE001 - the training's own error is the one to report
                reporter.log(f"the kept embedding could not be exported for other tools: {error}")
        raise
    if outputs.get("embedding"):
        outputs.update(export_for_other_tools(outputs["embedding"]))
    return outputs


def export_for_other_tools(embedding: str) -> dict[str, str]:
    """The files other tools load (formats.export_all, in an `export` folder beside the
    embedding): {format: path} for the formats of EXPORTS. Each keeps the name its tools call
    it by; A1111's one-tensor .safetensors is left out (the kohya file serves A1111 as well),
    diffusers' .bin too for SDXL (its two-file copies stay in export/diffusers), and
    OneTrainer's, whose name OneTrainer does not use, gets '-onetrainer' in its own (SD 3.x and
    Flux.1 get only diffusers' file and OneTrainer's, which ComfyUI reads by its name)."""
    from .formats import a1111_name, export_all, read_embedding

    written = export_all(embedding)
    run = read_embedding(embedding)
    if run.keys:
        written.pop("diffusers-bin", None)
    onetrainer = Path(written["onetrainer"])
    if "kohya" in written:  # beside it; SD 3.x and Flux.1 have no kohya file, and ComfyUI calls theirs by this name
        written["onetrainer"] = str(onetrainer.replace(onetrainer.with_name(f"{a1111_name(run.token)}-onetrainer{onetrainer.suffix}")))
    return {fmt: written[fmt] for fmt in EXPORTS if fmt in written}


def _refuse_untrained_family(store: ModelStore, model: str, what: str) -> None:
    """Refuse training on a family tinv-gui's methods do not handle (Family.trainable)."""
    family = store.family(model)
    if not family.trainable:
        raise ModelLoadError(f"{what} on {family.title} ({model}) is not supported yet; generating pictures with it is")


def _own_share(images, process: ProcessInfo, settings: TrainSettings, reporter: Reporter):
    """This process's pictures; with several processes, says which ones and the effective batch."""
    if not process.distributed:
        return images
    mine = shard(images, process)
    names = ", ".join(Path(i.path).name for i in mine)
    reporter.log(f"process {process.rank + 1}/{process.world} trains on: {names}")
    if process.is_main:
        effective = (settings.batch_size or 1) * settings.grad_accum * process.world
        reporter.log(
            f"effective batch size {effective} = batch {settings.batch_size} x accumulation {settings.grad_accum} "
            f"x {process.world} processes"
        )
    return mine


def run_evaluation(settings, store: ModelStore, reporter: Reporter) -> dict[str, str]:
    """Score an embedding as `settings` (tinv_gui.evaluate.EvalSettings) say; the figures go to
    the finished event's metrics and, with `settings.json_path`, to a JSON file ({"json": path})."""
    import json

    from .evaluate import evaluate_embedding

    result = evaluate_embedding(settings, store, reporter)
    if result is None:
        reporter.log("evaluation stopped before the end; no figures")
        return {}
    reporter.metrics.update({k: v for k, v in result.items() if k.endswith("similarity")}, guidance=float(result["guidance"]))
    if not settings.json_path:
        return {}
    atomic_write_text(settings.json_path, json.dumps(result, indent=2))
    return {"json": str(settings.json_path)}


def run_generation(settings, store: ModelStore, reporter: Reporter) -> dict[str, str]:
    """Draw pictures as `settings` (GenerateSettings, checked) say and save them;
    returns {"image": path, "image-1": ..., "without": ..., "without-1": ...}."""
    from .files import atomic_save_image
    from .generate import generate

    placement = choose_placement(settings.device, settings.precision, settings.fp8_weights)
    pipe = store.pipeline(settings.model, placement)
    runs = [("image", settings.embeddings, False)]
    if settings.compare and settings.embeddings:
        runs.append(("without", [], True))
    outputs = {}
    for name, embeddings, without in runs:
        pictures = generate(
            pipe, settings.prompt, settings.negative, embeddings, settings.prompt_embeds, settings.steps, settings.guidance,
            settings.seed, settings.dimensions, settings.count, placement, settings.sampler, settings.strength,
        )
        for i, (picture, path) in enumerate(zip(pictures, settings.picture_paths(without))):
            outputs[name + (f"-{i}" if i else "")] = str(atomic_save_image(picture, path))
    return outputs


def run_prompt_optimization(settings, store: ModelStore, reporter: Reporter) -> dict[str, str]:
    """Find the prompt for some pictures as `settings` (resolved PromptSettings) say; writes the
    results and a result.json into the output folder and returns {what: path}."""
    import json

    from .data import find_images, open_image
    from .methods.prompt_from_image import optimize_prompt, save_prompt_result, t5_words

    family = store.family(settings.model)
    family.check_generation(settings.negative, custom_sampler=False)  # Flux.1 runs without a negative prompt to optimize
    placement = choose_placement(settings.device, settings.precision, settings.fp8_weights)
    reporter.log(f"Device: {placement.describe()}")
    # A continuous prompt on SDXL is optimized against both text encoders' CLIP models, since the
    # saved conditioning holds both (SD 3.x likewise, T5 reading words); a readable prompt is
    # words, found with the first CLIP alone, which every text encoder reads.
    clips = _load_clips(settings, store, placement, reporter, count=1 if settings.hard else None)
    # The pipeline's own text encoders make the saved prompt_embeds; a hard prompt is plain text.
    pipe = None if settings.hard else store.pipeline(settings.model, placement)
    files = find_images(settings.images)
    images = [open_image(path, min_side=min(clip.image_size for clip in clips) // 2) for path in files]

    result = optimize_prompt(clips, images, settings, reporter)
    metadata = {"base_model": settings.model, "clip_model": ", ".join(clip.name for clip in clips), "steps": result.steps_done}
    # T5 (SD 3.x, Flux.1) has no image tower: beside a continuous prompt it reads the nearest words.
    words = t5_words(clips[0], result) if family.t5_encoder is not None and not settings.hard else []
    outputs = save_prompt_result(result, settings.output_dir, pipe, metadata, words)
    reporter.outputs.update(outputs)
    reporter.metrics.update(clip_similarity=result.similarity, steps=float(result.steps_done))
    keys = family.embedding_keys
    if len(clips) > 1:  # each CLIP's own figure (SDXL: clip_l, clip_g), the headline being their mean
        reporter.metrics.update({f"{key}_similarity": value for key, value in zip(keys, result.similarities)})
    if result.loss is not None:
        reporter.metrics["loss"] = result.loss
    if result.anchor_similarity is not None:
        reporter.metrics["anchor_similarity"] = result.anchor_similarity
    if result.texts:
        reporter.log(f"prompt: {result.texts[0]}")
        if len(result.texts) > 1:
            reporter.log(f"negative prompt: {result.texts[1]}")
    if words:
        reporter.log(f"T5 reads the words nearest to the continuous prompt: {words[0]}")
    reporter.log(f"CLIP similarity with the picture(s): {result.similarity:.4f}")

    texts = result.texts or []
    record = {
        "mode": settings.mode,
        **metadata,
        "images": [str(path) for path in files],
        "length": result.length,
        "prompt": texts[0] if texts else None,
        "negative_prompt": texts[1] if len(texts) > 1 else None,
        **({"t5_prompt": words[0]} if words else {}),
        "metrics": reporter.metrics,
    }
    summary = atomic_write_text(Path(settings.output_dir) / "result.json", json.dumps(record, indent=2))
    return {**outputs, "result": str(summary)}


def _load_clips(settings, store, placement, reporter, count: int | None = None):
    """The CLIP model of each of the pipeline's CLIP text encoders (SDXL and SD 3.x have two; T5
    has none), or of the first `count`."""
    family = store.family(settings.model)
    encoders = [i for i in range(family.text_encoder_count) if i != family.t5_encoder][:count]
    names = (settings.clip_model, settings.clip_model_g)[: len(encoders)]
    reporter.log(f"Loading the CLIP model{'s' if len(names) > 1 else ''} for {settings.model}")
    return [store.clip(settings.model, name, placement, encoder) for encoder, name in zip(encoders, names)]


def _word_parts(settings, store) -> dict[int, object]:
    """The start of a token's parts that no CLIP model can learn (T5's, in SD 3.x and Flux.1): the
    starting word's pieces in that encoder's own vocabulary (random without one), by encoder."""
    from .embeddings import initial_vectors

    family = store.family(settings.model)
    return {
        i: initial_vectors(
            store.word_table(settings.model, i), store.tokenizer(settings.model, i), settings.init, settings.vectors, settings.seed,
            first_tokenizer=store.tokenizer(settings.model, 0),
        )
        for i in range(family.text_encoder_count) if i == family.t5_encoder
    }


def _clips_and_pictures(settings, store, placement, reporter, writer):
    """The CLIP model of each text encoder (SDXL has two), and this process's pictures at CLIP's size."""
    clips = _load_clips(settings, store, placement, reporter)
    writer.metadata["clip_model"] = ", ".join(clip.name for clip in clips)
    # Load slightly above CLIP's size so the corner views have room to differ.
    size = max(clip.image_size for clip in clips)
    images = load_dataset(settings.images, size=int(size * 1.15) + 1, min_side=min(clip.image_size for clip in clips) // 2)
    images = _own_share(images, reporter.process or ProcessInfo(0, 1), settings, reporter)
    reporter.log(f"{len(images)} pictures ready for CLIP")
    return clips, images
