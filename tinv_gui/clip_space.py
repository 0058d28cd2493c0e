"""CLIP-space pieces shared by QuickEmbedding and prompt optimization."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image

from .models import ClipBundle


def spherical_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared great-circle distance between directions (0 when aligned), as in CLIP-guided work."""
    x = F.normalize(x, dim=-1)
    y = F.normalize(y, dim=-1)
    return (x - y).norm(dim=-1).div(2).arcsin().pow(2).mul(2)


def pooled_text_features(clip: ClipBundle, input_ids: torch.Tensor) -> torch.Tensor:
    """Projected text embeddings, pooled at the first end-of-text token of each row.

    New tokens have ids above the end-of-text id, so the `argmax(ids)` trick of the original
    CLIP code would pool at a new token instead.
    """
    model = clip.model
    input_ids = input_ids.to(clip.placement.device)
    hidden = model.text_model(input_ids=input_ids).last_hidden_state
    eot = (input_ids == clip.tokenizer.eos_token_id).int().argmax(dim=-1)
    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), eot]
    return model.text_projection(pooled)


def _to_tensor(image: Image.Image, clip: ClipBundle) -> torch.Tensor:
    array = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(image.height, image.width, 3)
    pixels = array.permute(2, 0, 1).float() / 255.0
    mean = torch.tensor(clip.image_mean).view(3, 1, 1)
    std = torch.tensor(clip.image_std).view(3, 1, 1)
    return (pixels - mean) / std


def image_views(image: Image.Image, size: int, crops: int) -> list[Image.Image]:
    """`crops` square views of a picture at CLIP's size: the whole (center) view first, then corner
    crops of a slightly larger copy and a mirrored view, so the embedding is not one framing's."""
    rgb = image.convert("RGB")
    center = rgb.resize((size, size), Image.Resampling.BICUBIC) if rgb.width == rgb.height else _fit(rgb, size)
    views = [center]
    if crops > 1:
        big = _fit(rgb, int(size * 1.15))
        edge = big.width - size
        for left, top in ((0, 0), (edge, 0), (0, edge), (edge, edge)):
            views.append(big.crop((left, top, left + size, top + size)))
        views.append(center.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    return views[:crops]


def _fit(image: Image.Image, size: int) -> Image.Image:
    from PIL import ImageOps

    return ImageOps.fit(image, (size, size), method=Image.Resampling.BICUBIC)


@torch.no_grad()
def image_features(clip: ClipBundle, images: list[Image.Image], crops: int = 6) -> torch.Tensor:
    """Unit-length CLIP image embeddings [n, proj], each the mean over `crops` views, computed once."""
    features = []
    for image in images:
        batch = torch.stack([_to_tensor(v, clip) for v in image_views(image, clip.image_size, crops)])
        batch = batch.to(clip.placement.device, clip.model.dtype)
        with clip.placement.autocast():
            pooled = clip.model.vision_model(pixel_values=batch).pooler_output
            embeds = clip.model.visual_projection(pooled)
        features.append(F.normalize(F.normalize(embeds.float(), dim=-1).mean(0), dim=-1))
    return torch.stack(features)
