"""How good is a learned token? The two measures of the textual inversion and DreamBooth papers.

- CLIP image similarity: mean cosine between the CLIP embeddings of every generated picture and
  every training picture (does it look like the concept?).
- CLIP text similarity: mean cosine between the generated pictures and the prompt with the token
  taken out (does the rest of the prompt still get through?). "a photo of <cat> on the beach" is
  compared with "a photo of on the beach", as in the textual inversion paper.

The same two figures for the initializer word in the token's place (same seeds) are the baseline:
a token worth having beats its initializer on image similarity without losing much text similarity.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from .clip_space import image_features, pooled_text_features
from .data import load_dataset
from .device import Placement, choose_placement
from .embeddings import mentions, replace_name
from .events import Reporter
from .families import family_of
from .files import atomic_save_image
from .formats import check_fits, read_embedding
from .generate import generate, resolved_guidance
from .models import ClipBundle, ModelStore, pipeline_text_widths
from .settings import EvalSettings, SettingsError


def without_token(prompt: str, token: str, replacement: str = "") -> str:
    """The prompt with every `token` replaced (removed by default), spaces tidied."""
    return re.sub(r"\s+", " ", replace_name(prompt, token, replacement)).strip()


def _draw_each_seed(pipe, prompt: str, embeddings: list, settings: EvalSettings, placement: Placement, reporter: Reporter, phase: str) -> list[Image.Image]:
    """One picture per seed (generate.generate), stopping early when asked."""
    images = []
    for i in range(settings.n):
        if reporter.should_stop():
            break
        reporter.step_started()
        picture = generate(
            pipe, prompt, embeddings=embeddings, steps=settings.steps, guidance=settings.guidance, seed=settings.seed + i,
            size=settings.dimensions, placement=placement,
        )
        images.append(picture[0])
        reporter.step_finished(0.0, 0.0, phase)
    return images


@torch.no_grad()
def clip_similarities(clip: ClipBundle, generated: list[Image.Image], reference: torch.Tensor, text: str) -> tuple[float, float]:
    """(image similarity, text similarity) of `generated` against the unit-length `reference`
    picture features and against `text`."""
    features = image_features(clip, generated, crops=1)
    ids = clip.tokenizer(text, truncation=True, max_length=clip.tokenizer.model_max_length).input_ids
    with clip.placement.autocast():
        text_features = pooled_text_features(clip, torch.tensor([ids]))
    text_features = F.normalize(text_features.float(), dim=-1).to(features.device)
    image_similarity = (features @ reference.to(features.device).T).mean()
    text_similarity = (features @ text_features.T).mean()
    return float(image_similarity), float(text_similarity)


def evaluate_embedding(settings: EvalSettings, store: ModelStore, reporter: Reporter) -> dict | None:
    """Generate `n` pictures with the token and `n` with the baseline word, and score both.
    Returns the figures and what they were computed from; None when stopped before the end."""
    settings.check()
    placement = choose_placement(settings.device, settings.precision, settings.fp8_weights)
    reporter.log(f"Device: {placement.describe()}")
    pipe = store.pipeline(settings.model, placement)
    embedding = read_embedding(settings.embedding)
    check_fits(embedding, pipeline_text_widths(pipe), Path(settings.embedding).name)  # before the long part
    token = embedding.token
    if not mentions(settings.prompt, token):
        raise SettingsError("prompt", f"the prompt must use the embedding's token {token!r}, e.g. 'a photo of {token}'")
    baseline_word = settings.init if settings.init is not None else embedding.metadata.get("init", "")
    text = without_token(settings.prompt, token)
    baseline_prompt = without_token(settings.prompt, token, baseline_word)

    clip = store.clip(settings.model, settings.clip_model, placement)
    pictures = load_dataset(settings.images, size=clip.image_size)
    reference = image_features(clip, [p.image for p in pictures], crops=1)
    reporter.log(f"{len(pictures)} training pictures; generating {settings.n} pictures with {token!r}, then {settings.n} with {baseline_word or 'no word'!r}")

    with_token = _draw_each_seed(pipe, settings.prompt, [settings.embedding], settings, placement, reporter, "generate (token)")
    baseline = _draw_each_seed(pipe, baseline_prompt, [], settings, placement, reporter, "generate (baseline)")
    if reporter.should_stop() or len(baseline) < settings.n:
        return None
    if settings.save_images:
        _save_pictures(Path(settings.save_images), with_token, baseline)

    image_similarity, text_similarity = clip_similarities(clip, with_token, reference, text)
    baseline_image, baseline_text = clip_similarities(clip, baseline, reference, text)
    return {
        "clip_image_similarity": image_similarity,
        "clip_text_similarity": text_similarity,
        "baseline_clip_image_similarity": baseline_image,
        "baseline_clip_text_similarity": baseline_text,
        "baseline_word": baseline_word,
        "token": token,
        "prompt": settings.prompt,
        "text_prompt": text,
        "baseline_prompt": baseline_prompt,
        "n": settings.n,
        "seed": settings.seed,
        "steps": settings.steps,
        "guidance": resolved_guidance(family_of(pipe), settings.guidance),
        "size": settings.size,
        "training_pictures": len(pictures),
        "model": settings.model,
        "clip_model": clip.name,
        "embedding": str(settings.embedding),
    }


def _save_pictures(folder: Path, with_token: list[Image.Image], baseline: list[Image.Image]) -> None:
    for kind, images in (("token", with_token), ("baseline", baseline)):
        for i, image in enumerate(images):
            atomic_save_image(image, folder / f"{kind}-{i:02d}.png")
