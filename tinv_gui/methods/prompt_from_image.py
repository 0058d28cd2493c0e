"""Prompt from an image: find the prompt whose CLIP text embedding best matches some pictures.

Continuous (after Ethan Smith's SGDImagePrompt): the input token embeddings of a whole prompt
are the free parameters. Each step runs the frozen text tower, pools at the end-of-text token,
projects, and lowers the spherical distance to the pictures' CLIP image embeddings. The result
is the pipeline's text encoder output for those inputs, usable as `pipe(prompt_embeds=...)`.

Hard (Wen et al. 2023, "Hard Prompts Made Easy"): the same objective, but every step snaps the
free embeddings to their nearest vocabulary tokens, evaluates the loss and its gradient there,
and applies that gradient to the free embeddings. The best snapped prompt seen is kept, and
comes out as plain text that works in any Stable Diffusion tool.

Both modes run only the text tower on [start, L tokens, end]: with causal attention nothing
after the end-of-text token changes the pooled output, so no padding to 77 is computed.

SDXL (continuous only) has two text encoders, the text towers of two CLIP models (ViT-L and
OpenCLIP bigG). Every free token then has one input embedding per encoder, side by side as in
QuickEmbedding; each CLIP scores its own part against its own image embeddings, and the loss is
the mean of the two. The saved result is SDXL's conditioning: both encoders' penultimate hidden
states side by side, and the second encoder's pooled projection.

SD 3.x and Flux.1 condition on T5 as well, which has no image tower. A continuous prompt learns
its CLIP parts as SDXL's (SD 3.x: CLIP-L and bigG; Flux.1: CLIP-L, whose pooled vector is all
Flux.1 takes from CLIP), and T5 reads words: the readable words nearest to the free CLIP-L
vectors, as a hard prompt snaps them (`t5_words`), so the prompt's content reaches T5 too. The
saved result is the family's conditioning from those (hidden states and pooled vectors) and the
words are written beside it. A readable prompt is plain text, which every encoder reads.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from ..clip_space import image_features, pooled_text_features, spherical_distance
from ..embeddings import extended_vocabularies, tokenize_words
from ..events import Reporter
from ..families import family_of
from ..files import atomic_save_safetensors, atomic_write_text
from ..models import ClipBundle
from ..settings import DEFAULT_PROMPT_LENGTH, PromptSettings, SettingsError
from ..training import LoopSettings, optimize

PROMPT_EMBEDS_FILE = "prompt_embeds.safetensors"
PROMPT_FILE = "prompt.txt"
T5_PROMPT_FILE = "t5_prompt.txt"  # what T5 reads beside a continuous prompt (SD 3.x, Flux.1)
NEGATIVE_PROMPT_FILE = "negative_prompt.txt"
# spherical_distance of opposite directions: a negative prompt's loss is this minus its distance
MAX_DISTANCE = math.pi**2 / 2


@dataclass
class PromptResult:
    """The optimized prompt (and negative, when one was given)."""

    # [rows * length, dim] input embeddings (SDXL: [.., dim_l + dim_g]), float32, CPU: prompt then negative
    vectors: torch.Tensor
    length: int
    rows: int  # 1, or 2 with an optimized negative
    similarity: float  # weighted mean cosine similarity of the prompt with the pictures (SDXL: mean of both CLIPs')
    anchor_similarity: float | None
    steps_done: int
    stopped_early: bool
    loss: float | None  # the final loss (continuous) or the best loss (hard)
    token_ids: list[list[int]] | None = None  # hard: vocabulary ids per row
    texts: list[str] | None = None  # hard: readable text per row
    similarities: list[float] | None = None  # the similarity per CLIP model (SDXL: ViT-L's, then bigG's)


_readable_cache: weakref.WeakKeyDictionary[object, torch.Tensor] = weakref.WeakKeyDictionary()


def readable_token_ids(tokenizer) -> torch.Tensor:
    """Vocabulary ids a hard prompt may use: whole words (ending a word) whose text tokenizes
    back to exactly that id on its own. Prompts of such words, joined by spaces, re-tokenize to
    the same ids in any tool, so the printed text is exactly the prompt that was optimized."""
    if tokenizer in _readable_cache:
        return _readable_cache[tokenizer]
    special = set(tokenizer.all_special_ids)
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    candidates = [i for i, t in enumerate(tokens) if t.endswith("</w>") and i not in special]
    texts = [tokenizer.decode([i]) for i in candidates]
    backend = getattr(tokenizer, "backend_tokenizer", None)  # a fast tokenizer's own batch: the same ids, 3x quicker
    encoded = [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)] if backend else tokenizer(texts, add_special_tokens=False).input_ids
    ids = torch.tensor([i for i, got in zip(candidates, encoded) if got == [i]], dtype=torch.long)
    _readable_cache[tokenizer] = ids
    return ids


def readable_directions(table: torch.Tensor, readable: torch.Tensor) -> torch.Tensor:
    """Unit-length rows of the token `table` for the `readable` ids, to snap to by cosine."""
    return F.normalize(table.detach()[readable].float(), dim=-1)


def nearest_readable(free: torch.Tensor, readable: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """The readable id nearest (by cosine) to each free vector [n, width]: ids [n]."""
    return readable[(F.normalize(free.float(), dim=-1) @ directions.T).argmax(-1)]


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _starting_ids(tokenizer, settings: PromptSettings, length: int, readable: torch.Tensor | None) -> list[int]:
    """The tokens each row starts from, prompt then negative: the user's text, then padding as
    the tokenizer adds it; a hard prompt pads with random readable words instead, since
    identical pads would all snap to the same word."""
    if readable is not None:
        generator = torch.Generator().manual_seed(settings.seed)
        filler = readable.cpu()[torch.randint(len(readable), (length,), generator=generator)].tolist()
    else:
        filler = [_pad_id(tokenizer)] * length
    rows = [("prompt", settings.prompt or "")] + ([("negative prompt", settings.negative)] if settings.negative else [])
    start = []
    for field, text in rows:
        ids = tokenize_words(tokenizer, text) if text.strip() else []
        if len(ids) > length:
            raise SettingsError("length", f"the {field} is {len(ids)} tokens long; raise the length to at least {len(ids)} or shorten it")
        start += ids + filler[: length - len(ids)]
    return start


def _weights(images: list[Image.Image], weights: list[float] | None) -> torch.Tensor:
    if weights is None:
        weights = [1.0] * len(images)
    if len(weights) != len(images):
        raise SettingsError("image_weights", f"{len(weights)} weights for {len(images)} pictures; give one weight per picture")
    w = torch.tensor(weights, dtype=torch.float32)
    return w / w.sum()


def _prompt_ids(tokenizer, vocab: int, length: int, rows: int) -> torch.Tensor:
    """[rows, length + 2]: start marker, the free rows' ids (past the vocabulary), end marker."""
    return torch.tensor(
        [[tokenizer.bos_token_id, *range(vocab + r * length, vocab + (r + 1) * length), tokenizer.eos_token_id] for r in range(rows)]
    )


@torch.no_grad()
def text_features(clip: ClipBundle, texts: list[str]) -> torch.Tensor:
    """Unit-length CLIP text embeddings of plain prompts."""
    ids = clip.tokenizer(texts, padding=True, truncation=True, max_length=77, return_tensors="pt").input_ids
    with clip.placement.autocast():
        return F.normalize(pooled_text_features(clip, ids).float(), dim=-1)


def optimize_prompt(
    clips: ClipBundle | list[ClipBundle], images: list[Image.Image], settings: PromptSettings, reporter: Reporter
) -> PromptResult:
    """Find the prompt for `images` as `settings` (resolved) say; see the module notes. `clips` is
    the CLIP model of the pipeline's text encoder, or (continuous only) a list of one per text
    encoder (SDXL: ViT-L's, then bigG's)."""
    clips = [clips] if isinstance(clips, ClipBundle) else list(clips)
    if settings.hard and len(clips) > 1:
        # Snapping needs one vocabulary table to snap to; SDXL's readable prompts use its first CLIP.
        raise ValueError("a readable (hard) prompt is optimized against one CLIP model; pass only the first")
    tokenizer = clips[0].tokenizer
    device = clips[0].placement.device
    text_models = [clip.model.text_model for clip in clips]
    tables = [text_model.get_input_embeddings().weight for text_model in text_models]
    table = tables[0]
    length = settings.length or max(DEFAULT_PROMPT_LENGTH, len(tokenize_words(tokenizer, settings.prompt or "")))
    rows = 2 if settings.negative else 1
    weights = _weights(images, settings.image_weights).to(device)

    models = "CLIP" if len(clips) == 1 else "both CLIP models"
    reporter.log(f"Embedding {len(images)} picture(s) with {models}")
    targets = [image_features(clip, images, settings.crops) for clip in clips]  # [N, P] each, unit length
    anchors = [text_features(clip, [settings.anchor])[0] for clip in clips] if settings.anchor else [None] * len(clips)

    readable = readable_token_ids(tokenizer).to(device) if settings.hard else None
    # Each encoder starts from its own rows for the same words (their padding tokens differ).
    starts = [_starting_ids(clip.tokenizer, settings, length, readable) for clip in clips]
    parts = [t.detach()[torch.tensor(ids, device=t.device)].float().to(device) for t, ids in zip(tables, starts)]
    vectors = torch.cat(parts, dim=1).requires_grad_(True)
    prompt_ids = [_prompt_ids(clip.tokenizer, t.shape[0], length, rows) for clip, t in zip(clips, tables)]

    def objective(features: torch.Tensor, target: torch.Tensor, anchor: torch.Tensor | None) -> torch.Tensor:
        """Loss of pooled features [rows, P]: near the pictures (and the anchor), the negative far."""
        loss = (spherical_distance(features[0:1], target) * weights).sum()
        if anchor is not None:
            loss = loss + settings.anchor_weight * spherical_distance(features[0], anchor)
        if rows == 2:
            loss = loss + MAX_DISTANCE - (spherical_distance(features[1:2], target) * weights).sum()
        return loss

    snapped = {"ids": None}
    best = {"loss": math.inf, "ids": None}
    directions = readable_directions(table, readable) if settings.hard else None

    def project(free: torch.Tensor) -> torch.Tensor:
        """Nearest readable token (by cosine) for every free embedding; their table rows."""
        snapped["ids"] = nearest_readable(free, readable, directions)
        return table.detach()[snapped["ids"]].float()

    def compute_loss(_micro: int) -> torch.Tensor:
        losses = []
        for clip, ids, target, anchor in zip(clips, prompt_ids, targets, anchors):
            with clip.placement.autocast():
                features = pooled_text_features(clip, ids).float()
            losses.append(objective(features, target, anchor))
        loss = torch.stack(losses).mean()
        if settings.hard and float(loss.detach()) < best["loss"]:
            best["loss"], best["ids"] = float(loss.detach()), snapped["ids"].detach().cpu().view(rows, length)
        return loss

    loop = LoopSettings(
        steps=settings.steps, lr=settings.lr, weight_decay=settings.weight_decay, phase="hard prompt" if settings.hard else "prompt"
    )
    with extended_vocabularies(text_models, vectors):
        result, _ = optimize(vectors, compute_loss, loop, reporter, project=project if settings.hard else None)
        if not settings.hard:
            finals = []
            for clip, ids in zip(clips, prompt_ids):
                with torch.no_grad(), clip.placement.autocast():
                    finals.append(F.normalize(pooled_text_features(clip, ids[:1]).float(), dim=-1)[0])

    token_ids = texts = None
    loss = result.last_loss
    if settings.hard:
        if best["ids"] is None:  # stopped before the first step: the starting words
            best["ids"] = torch.tensor(starts[0]).view(rows, length)
        token_ids = best["ids"].tolist()
        texts = [tokenizer.decode(row) for row in token_ids]
        finals = [text_features(clips[0], texts[:1])[0]]
        loss = best["loss"] if math.isfinite(best["loss"]) else None
    similarities = [float((target @ final * weights).sum()) for target, final in zip(targets, finals)]
    anchor_similarity = None
    if settings.anchor:
        anchor_similarity = sum(float(final @ anchor) for final, anchor in zip(finals, anchors)) / len(finals)
    return PromptResult(
        vectors.detach().float().cpu(), length, rows, sum(similarities) / len(similarities), anchor_similarity,
        result.steps_done, result.stopped_early, loss, token_ids, texts, similarities,
    )


@torch.no_grad()
def t5_words(clip: ClipBundle, result: PromptResult) -> list[str]:
    """What T5 reads beside a continuous prompt (SD 3.x, Flux.1), one text per row: the readable
    words nearest to each free vector's part in `clip` (the first CLIP's, CLIP-L), by cosine, as a
    hard prompt snaps them."""
    table = clip.model.text_model.get_input_embeddings().weight
    readable = readable_token_ids(clip.tokenizer).to(table.device)
    free = result.vectors[:, : table.shape[1]].to(table.device)
    ids = nearest_readable(free, readable, readable_directions(table, readable)).view(result.rows, result.length)
    return [clip.tokenizer.decode(row) for row in ids.tolist()]


@torch.no_grad()
def pipeline_prompt_embeds(pipe, result: PromptResult, words: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The pipeline's own conditioning for the optimized prompt and negative, padded as diffusers
    pads, ready for `pipe(**tensors)`: `prompt_embeds` [1, 77, dim] and `negative_prompt_embeds`;
    on SDXL [1, 77, dim_l + dim_g] (both encoders' penultimate hidden states) plus
    `pooled_prompt_embeds` and `negative_pooled_prompt_embeds` [1, proj] (the second encoder's).
    Without an optimized negative, the negative is what diffusers' own `encode_prompt` gives when
    none is typed (SDXL models may make it zeros). SD 3.x and Flux.1: T5 reads `words` (one text
    per row, see t5_words); no negative is saved without an optimized one (SD 3.x's pipeline
    encodes the typed or empty negative itself; Flux.1 has none)."""
    from .textual_inversion import pad_prompts

    family = family_of(pipe)
    if family.t5_encoder is not None and words is None:
        raise ValueError(f"{family.title}'s T5 needs the words it reads beside the continuous prompt (t5_words)")
    encoders = family.text_encoders(pipe)
    prompts = []
    for index, (tokenizer, encoder, length) in enumerate(zip(family.tokenizers(pipe), encoders, family.prompt_lengths(pipe))):
        if index == family.t5_encoder:
            tokens = tokenizer(words, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
            prompts.append((tokens.input_ids.to(encoder.device), tokens.attention_mask.to(encoder.device)))
        else:
            ids = _prompt_ids(tokenizer, encoder.get_input_embeddings().num_embeddings, result.length, result.rows)
            prompts.append(pad_prompts(tokenizer, ids.tolist(), encoder.device, length))
    clip_encoders = [encoder for index, encoder in enumerate(encoders) if index != family.t5_encoder]
    with extended_vocabularies(clip_encoders, result.vectors.to(encoders[0].device)):
        hidden, pooled = family.encode_prompts(encoders, prompts)
    row = (lambda t, i: None if t is None else t[i : i + 1])  # noqa: E731
    out = family.pipeline_conditioning(hidden[0:1], row(pooled, 0))
    device = encoders[0].device
    if result.rows == 2:
        out.update(family.pipeline_conditioning(hidden[1:2], row(pooled, 1), prefix="negative_"))
    elif family.t5_encoder is not None:
        pass  # SD 3.x encodes the negative prompt itself; Flux.1 has none
    elif pooled is None:
        out["negative_prompt_embeds"] = pipe.encode_prompt("", device, 1, False)[0]
    else:
        # With guidance on, SDXL's encode_prompt returns the negative it would use for no negative prompt.
        _, negative, _, negative_pooled = pipe.encode_prompt("", device=device, num_images_per_prompt=1, do_classifier_free_guidance=True)
        out["negative_prompt_embeds"], out["negative_pooled_prompt_embeds"] = negative, negative_pooled
    return {name: tensor.contiguous() for name, tensor in out.items()}


def save_prompt_result(result: PromptResult, output_dir, pipe=None, metadata: dict | None = None, words: list[str] | None = None) -> dict[str, str]:
    """Write the result into `output_dir`: prompt.txt (and negative_prompt.txt) for a hard prompt,
    prompt_embeds.safetensors (needs the pipeline; see pipeline_prompt_embeds) for a continuous
    one, and on SD 3.x and Flux.1 t5_prompt.txt, the `words` T5 reads (t5_words). Returns what -> path."""
    from pathlib import Path

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if result.texts is not None:
        outputs = {}
        for name, text, file in zip(("prompt", "negative_prompt"), result.texts, (PROMPT_FILE, NEGATIVE_PROMPT_FILE)):
            outputs[name] = str(atomic_write_text(output_dir / file, text + "\n"))
        return outputs
    meta = {"format": "prompt_embeds", "similarity": f"{result.similarity:.6f}", "length": str(result.length)}
    meta.update({k: str(v) for k, v in (metadata or {}).items() if v is not None})
    outputs = {}
    if words:
        meta.update(zip(("t5_prompt", "t5_negative_prompt"), words))
        outputs["t5_prompt"] = str(atomic_write_text(output_dir / T5_PROMPT_FILE, "\n".join(words) + "\n"))
    path = atomic_save_safetensors(pipeline_prompt_embeds(pipe, result, words), output_dir / PROMPT_EMBEDS_FILE, meta)
    return {"prompt_embeds": str(path), **outputs}
