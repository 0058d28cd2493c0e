"""QuickEmbedding (Ethan Smith): learn a token in CLIP space only.

Prompts holding the token go through CLIP's text tower; their pooled, projected embedding is
pulled towards the CLIP image embeddings of the pictures. No UNet and no VAE run, so a run
takes seconds on a GPU and about a minute on a CPU; the result also warm-starts textual
inversion, since CLIP's text tower is Stable Diffusion's text encoder.

SDXL has two text encoders, the text towers of two CLIP models (ViT-L and OpenCLIP bigG): each
part of the token's vectors is pulled towards its own CLIP's image embeddings, the loss being
the mean of the two.

SD 3.x and Flux.1 condition on T5 as well, which has no image tower: its part of the token stays
at the starting word's T5 pieces (`word_parts`), and only the CLIP parts learn here.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..clip_space import (
    CachedPrefixPrompts,
    blank_outside_mask,
    image_features,
    spherical_distance,
)
from ..data import TrainImage, sample_indices, training_prompts
from ..embeddings import (
    encode_with_placeholder,
    extended_vocabularies,
    initial_vectors,
    validate_token,
)
from ..events import Reporter
from ..models import ClipBundle
from ..training import EmbeddingWriter, LoopSettings, optimize

if TYPE_CHECKING:  # settings import the method registry, which imports the methods
    from ..settings import TrainSettings


@dataclass
class QuickResult:
    vectors: torch.Tensor  # [n, dim] (SDXL: [n, dim_l + dim_g]), float32, on the CPU
    steps_done: int
    stopped_early: bool
    last_loss: float | None


def train_quick(
    clips: ClipBundle | list[ClipBundle],
    images: list[TrainImage],
    settings: TrainSettings,
    reporter: Reporter,
    writer: EmbeddingWriter | None = None,
    phase: str = "quick",
    word_parts: dict[int, torch.Tensor] | None = None,
) -> QuickResult:
    """Learn `settings.token` with QuickEmbedding; `settings` must be resolved (defaults filled).
    `clips` is the CLIP model of the pipeline's text encoder, or a list of one per text encoder
    (SDXL: ViT-L's, then bigG's). `word_parts` ({text encoder: [n, width]}) are the parts of
    text encoders without a CLIP model (T5's), kept as they are and saved, and returned, in place."""
    clips = [clips] if isinstance(clips, ClipBundle) else list(clips)
    token = validate_token(settings.token, clips[0].tokenizer)
    device = clips[0].placement.device
    text_models = [clip.model.text_model for clip in clips]
    tables = [text_model.get_input_embeddings().weight for text_model in text_models]
    parts = [initial_vectors(table, clip.tokenizer, settings.init, settings.vectors, settings.seed) for table, clip in zip(tables, clips)]
    vectors = torch.cat(parts, dim=1).to(device).requires_grad_(True)

    models = "CLIP" if len(clips) == 1 else "both CLIP models"
    reporter.log(f"Embedding {len(images)} pictures with {models} ({settings.crops} views each)")
    pictures = [blank_outside_mask(i.image, i.mask, settings.unmasked_weight) for i in images]
    targets = [image_features(clip, pictures, settings.crops) for clip in clips]  # [N, P] each, unit length

    # Prompts are tokenized once; the new vectors take ids just past the vocabulary, and what comes
    # before them in each prompt goes through the text tower once, not at every step.
    prompts = training_prompts(images, token, settings.style, settings.use_captions)
    cached = []
    for clip, table in zip(clips, tables):
        placeholder_ids = list(range(table.shape[0], table.shape[0] + settings.vectors))
        encoded = [encode_with_placeholder(clip.tokenizer, p, token, placeholder_ids) for p in prompts]
        cached.append(CachedPrefixPrompts(clip, encoded, first_new_id=table.shape[0]))
    rng = random.Random(settings.seed)

    def compute_loss(_micro: int) -> torch.Tensor:
        picked = torch.tensor(sample_indices(len(prompts), settings.batch_size, rng))
        # A batch larger than the prompt list repeats prompts: compute each once, count it twice.
        rows, counts = picked.unique(return_counts=True)
        losses = []
        for clip, prompt_cache, target in zip(clips, cached, targets):
            with clip.placement.autocast():
                features = prompt_cache.pooled(rows.tolist()).float()
            if settings.use_captions:  # each caption belongs to its own picture
                distances = spherical_distance(features, target[rows])
            else:
                distances = spherical_distance(features[:, None, :], target[None, :, :]).mean(dim=1)
            losses.append((distances * counts.to(distances)).sum() / len(picked))
        return torch.stack(losses).mean()

    def whole_token() -> torch.Tensor:
        """The CLIP parts learned here with the word parts in their places, in encoder order."""
        clip_parts = iter(torch.split(vectors.detach().float().cpu(), [table.shape[1] for table in tables], dim=1))
        count = len(clips) + len(word_parts or {})
        return torch.cat([word_parts[i] if i in (word_parts or {}) else next(clip_parts) for i in range(count)], dim=1)

    loop = LoopSettings.of(settings, phase)
    on_step = (lambda step, _optimizer: writer.checkpoint(whole_token(), reporter.steps_done)) if writer else None
    with extended_vocabularies(text_models, vectors):
        try:
            result, _ = optimize(vectors, compute_loss, loop, reporter, on_step=on_step, whole=lambda _: whole_token())
        finally:
            if writer is not None:  # keep the last good vectors, whatever happened
                writer.save(whole_token(), reporter.steps_done)
    return QuickResult(whole_token(), result.steps_done, result.stopped_early, result.last_loss)
