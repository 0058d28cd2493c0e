"""QuickEmbedding (Ethan Smith): learn a token in CLIP space only.

Prompts holding the token go through CLIP's text tower; their pooled, projected embedding is
pulled towards the CLIP image embeddings of the pictures. No UNet and no VAE run, so a run
takes seconds on a GPU and about a minute on a CPU; the result also warm-starts textual
inversion, since CLIP's text tower is Stable Diffusion's text encoder.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..clip_space import CachedPrefixPrompts, image_features, spherical_distance
from ..data import TrainImage, sample_indices, training_prompts
from ..embeddings import encode_with_placeholder, extended_vocabulary, initial_vectors, validate_token
from ..events import Reporter
from ..models import ClipBundle
from ..settings import TrainSettings
from ..training import EmbeddingWriter, LoopSettings, optimize


@dataclass
class QuickResult:
    vectors: torch.Tensor  # [n, dim], float32, on the CPU
    steps_done: int
    stopped_early: bool
    last_loss: float | None


def train_quick(
    clip: ClipBundle,
    images: list[TrainImage],
    settings: TrainSettings,
    reporter: Reporter,
    writer: EmbeddingWriter | None = None,
    phase: str = "quick",
) -> QuickResult:
    """Learn `settings.token` with QuickEmbedding; `settings` must be resolved (defaults filled)."""
    tokenizer = clip.tokenizer
    token = validate_token(settings.token, tokenizer)
    device = clip.placement.device
    text_model = clip.model.text_model
    table = text_model.get_input_embeddings().weight
    vectors = initial_vectors(table, tokenizer, settings.init, settings.vectors, settings.seed)
    vectors = vectors.to(device).requires_grad_(True)

    reporter.log(f"Embedding {len(images)} pictures with CLIP ({settings.crops} views each)")
    targets = image_features(clip, [i.image for i in images], settings.crops)  # [N, P], unit length

    # Prompts are tokenized once; the new vectors take ids just past the vocabulary, and what comes
    # before them in each prompt goes through the text tower once, not at every step.
    prompts = training_prompts(images, token, settings.style, settings.use_captions)
    placeholder_ids = list(range(table.shape[0], table.shape[0] + settings.vectors))
    encoded = [encode_with_placeholder(tokenizer, p, token, placeholder_ids) for p in prompts]
    cached = CachedPrefixPrompts(clip, encoded, first_new_id=table.shape[0])
    rng = random.Random(settings.seed)

    def compute_loss(_micro: int) -> torch.Tensor:
        picked = torch.tensor(sample_indices(len(encoded), settings.batch_size, rng))
        # A batch larger than the prompt list repeats prompts: compute each once, count it twice.
        rows, counts = picked.unique(return_counts=True)
        with clip.placement.autocast():
            features = cached.pooled(rows.tolist()).float()
        if settings.use_captions:  # each caption belongs to its own picture
            distances = spherical_distance(features, targets[rows])
        else:
            distances = spherical_distance(features[:, None, :], targets[None, :, :]).mean(dim=1)
        return (distances * counts.to(distances)).sum() / len(picked)

    loop = LoopSettings.of(settings, phase)
    on_step = (lambda step, _optimizer: writer.checkpoint(vectors, reporter.steps_done)) if writer else None
    with extended_vocabulary(text_model, vectors):
        try:
            result, _ = optimize(vectors, compute_loss, loop, reporter, on_step=on_step)
        finally:
            if writer is not None:  # keep the last good vectors, whatever happened
                writer.save(vectors, reporter.steps_done)
    return QuickResult(vectors.detach().float().cpu(), result.steps_done, result.stopped_early, result.last_loss)
