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


class CachedPrefixPrompts:
    """Fixed prompts through CLIP's text tower, their unchanging beginnings computed only once.

    The tower's attention is causal, so whatever comes before a prompt's first new token is the
    same at every step: its keys and values in every layer are computed here, once. A step then
    runs only the rest of each prompt, from the first new token to the end-of-text token that is
    pooled (nothing after it can matter), which is a few positions instead of the whole prompt.
    Features equal those of `pooled_text_features` on the whole prompts.
    """

    def __init__(self, clip: ClipBundle, prompts: list[list[int]], first_new_id: int):
        self.clip = clip
        device = clip.placement.device
        eos = clip.tokenizer.eos_token_id
        prefixes, self.suffixes = [], []
        for ids in prompts:
            end = ids.index(eos)
            start = next((i for i, token in enumerate(ids[:end]) if token >= first_new_id), end)
            prefixes.append(ids[:start])
            self.suffixes.append(ids[start : end + 1])
        self.prefix_lengths = torch.tensor([len(p) for p in prefixes], device=device)
        longest = int(self.prefix_lengths.max())
        self.prefix_valid = torch.arange(longest, device=device)[None, :] < self.prefix_lengths[:, None]
        padded = torch.tensor([p + [eos] * (longest - len(p)) for p in prefixes], device=device)
        positions = torch.arange(longest, device=device).expand(len(prompts), -1)
        causal = torch.ones(longest, longest, dtype=torch.bool, device=device).tril()
        with torch.no_grad(), clip.placement.autocast():
            _, self.past = self._run(padded, positions, causal, [])

    def pooled(self, rows: list[int]) -> torch.Tensor:
        """Projected text features [len(rows), proj] of the prompts at `rows`."""
        device = self.clip.placement.device
        suffixes = [self.suffixes[r] for r in rows]
        length = max(len(s) for s in suffixes)
        ids = torch.tensor([s + [s[-1]] * (length - len(s)) for s in suffixes], device=device)
        rows_t = torch.tensor(rows, device=device)
        last_position = self.clip.model.text_model.embeddings.position_embedding.num_embeddings - 1
        # Padding after a short suffix could run past the last position; it is never looked at.
        positions = (self.prefix_lengths[rows_t, None] + torch.arange(length, device=device)).clamp(max=last_position)
        causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        mask = torch.cat([self.prefix_valid[rows_t, None, :].expand(-1, length, -1), causal.expand(len(rows), -1, -1)], dim=-1)
        past = [(k[rows_t], v[rows_t]) for k, v in self.past]
        hidden, _ = self._run(ids, positions, mask[:, None], past)
        last = torch.tensor([len(s) - 1 for s in suffixes], device=device)
        return self.clip.model.text_projection(hidden[torch.arange(len(rows), device=device), last])

    def _run(self, ids, positions, mask, past):
        """The text tower's layers on `ids` after the cached keys and values `past` (one pair per
        layer, or none); returns the final hidden states and this part's own keys and values."""
        text = self.clip.model.text_model
        x = text.embeddings(input_ids=ids, position_ids=positions)
        own = []
        for i, layer in enumerate(text.encoder.layers):
            attention = layer.self_attn
            h = layer.layer_norm1(x)
            batch, length, _ = h.shape

            def heads(t):
                return t.view(batch, length, attention.num_heads, attention.head_dim).transpose(1, 2)

            q, k, v = heads(attention.q_proj(h)), heads(attention.k_proj(h)), heads(attention.v_proj(h))
            own.append((k, v))
            if past:
                k, v = torch.cat([past[i][0], k], dim=2), torch.cat([past[i][1], v], dim=2)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attention.scale)
            x = x + attention.out_proj(out.transpose(1, 2).reshape(batch, length, -1))
            x = x + layer.mlp(layer.layer_norm2(x))
        return text.final_layer_norm(x), own


def blank_outside_mask(image: Image.Image, mask: Image.Image | None, unmasked_weight: float) -> Image.Image:
    """The picture with what lies outside its mask faded to white (as transparency is shown), so
    CLIP sees the subject and not its background: kept where the mask is white, `unmasked_weight`
    of it kept where the mask is black."""
    if mask is None or unmasked_weight == 1:
        return image
    keep = mask.point(lambda value: round(255 * unmasked_weight + (1 - unmasked_weight) * value))
    return Image.composite(image.convert("RGB"), Image.new("RGB", image.size, (255, 255, 255)), keep)


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
