"""Embeddings inside pictures ("cards"), in the two encodings AUTOMATIC1111 reads from .png/.webp.

A1111 stores the embedding's dictionary ({"string_to_param": {"*": tensor}, "name": ..., ...})
as JSON, where a tensor is written {"TORCHTENSOR": nested lists of numbers}:
- in a text chunk named `sd-ti-embedding`, holding that JSON in base64 (PNG only);
- in the pixels, which survive tools that drop text chunks: the zlib-compressed JSON is split
  into low and high 4-bit halves; each half fills a block of pixels (rows as tall as the picture,
  3 values a pixel, row by row), whose low bits are XOR-ed with a fixed pseudo-random sequence
  (a linear congruential generator, seed 0, values mod 255). The picture sits between the two
  blocks, each block separated from it by one black column: [low | black | picture | black | high].
  A reader crops the black border, keeps the low 4 bits, takes the blocks left of the first and
  right of the last all-zero column, undoes the XOR and joins the halves.

A card written here carries both, so A1111's reader (which prefers the text chunk) and ours read it.
"""

from __future__ import annotations

import base64
import io
import json
import zlib

import numpy as np
import torch
from PIL import Image, ImageDraw, PngImagePlugin

TEXT_CHUNK = "sd-ti-embedding"
_TENSOR_KEY = "TORCHTENSOR"
_MAX_JSON_BYTES = 64 << 20  # far above any embedding; stops a zlib bomb
# The high 4 bits of every data pixel are set, so no data pixel is black (the border A1111 crops).
_DATA_HIGH_BITS = 0x80


class CardError(ValueError):
    """A picture holds no embedding, or a damaged one."""


_mask = np.zeros(0, dtype=np.uint8)


def _mask_sequence(count: int) -> np.ndarray:
    """The first `count` values of the LCG (m=2**32, a=1664525, c=1013904223, seed 0), each
    mod 255 and then its low 4 bits: the mask XOR-ed onto the data's low bits."""
    global _mask
    if len(_mask) < count:  # the sequence is fixed: compute it once, as far as asked
        values = np.empty(count, dtype=np.uint8)
        state = 0
        for i in range(count):
            state = (1664525 * state + 1013904223) & 0xFFFFFFFF
            values[i] = (state % 255) & 0x0F
        _mask = values
    return _mask[:count]


def _to_json(data: dict) -> str:
    def encode(value):
        if isinstance(value, torch.Tensor):
            return {_TENSOR_KEY: value.detach().cpu().float().tolist()}
        if isinstance(value, dict):
            return {key: encode(item) for key, item in value.items()}
        return value

    return json.dumps(encode(data), allow_nan=False)


def _from_json(text: bytes | str) -> dict:
    def decode(obj: dict):
        if _TENSOR_KEY in obj:
            return torch.tensor(obj[_TENSOR_KEY], dtype=torch.float64)
        return obj

    data = json.loads(text, object_hook=decode)
    if not isinstance(data, dict):
        raise CardError("the embedding inside is not a dictionary")
    return data


def _data_block(nibbles: np.ndarray, height: int) -> np.ndarray:
    """`nibbles` laid out row by row in a [height, width, 3] block (zero-padded), low bits masked."""
    per_row = -(-len(nibbles) // height)  # values a row: ceil
    per_row = -(-per_row // 3) * 3  # whole pixels
    block = np.zeros(height * per_row, dtype=np.uint8)
    block[: len(nibbles)] = nibbles
    block ^= _mask_sequence(block.size)
    return (block | _DATA_HIGH_BITS).reshape(height, per_row // 3, 3)


def embed_in_pixels(picture: Image.Image, data: dict) -> Image.Image:
    """The picture framed by the two data blocks that carry `data` (see the module's notes)."""
    picture = picture.convert("RGB")
    packed = np.frombuffer(zlib.compress(_to_json(data).encode(), 9), dtype=np.uint8)
    low, high = _data_block(packed & 0x0F, picture.height), _data_block(packed >> 4, picture.height)
    width = low.shape[1] + 1 + picture.width + 1 + high.shape[1]
    card = Image.new("RGB", (width, picture.height), (0, 0, 0))
    card.paste(Image.fromarray(low, "RGB"), (0, 0))
    card.paste(picture, (low.shape[1] + 1, 0))
    card.paste(Image.fromarray(high, "RGB"), (low.shape[1] + 1 + picture.width + 1, 0))
    return card


def read_from_pixels(image: Image.Image) -> dict | None:
    """The dictionary stored in the pixels, or None when the picture has no data blocks."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
    lit = (pixels > 0).all(axis=2)  # the black border around the card is cropped first
    if not lit.any():
        return None
    rows, columns = np.flatnonzero(lit.any(axis=1)), np.flatnonzero(lit.any(axis=0))
    low_bits = pixels[rows[0] : rows[-1] + 1, columns[0] : columns[-1] + 1] & 0x0F
    black = np.flatnonzero(low_bits.sum(axis=(0, 2)) == 0)
    if len(black) < 2:
        return None
    halves = []
    for block in (low_bits[:, : black.min()], low_bits[:, black.max() + 1 :]):
        flat = block.reshape(-1)
        halves.append(flat ^ _mask_sequence(flat.size))
    if halves[0].size != halves[1].size:
        return None
    packed = ((halves[1] << 4) | halves[0]).astype(np.uint8).tobytes()
    try:
        inflater = zlib.decompressobj()
        text = inflater.decompress(packed, _MAX_JSON_BYTES)
        return _from_json(text)
    except (zlib.error, ValueError) as error:
        raise CardError(f"the data in its pixels is damaged ({error})") from None


def read_card(path) -> dict:
    """The embedding dictionary a .png/.webp card holds: from its text chunk when it has one
    (as A1111 does), otherwise from its pixels. Raises CardError when it holds none."""
    with Image.open(path) as image:
        image.load()
        text = getattr(image, "text", {}) or {}
        if TEXT_CHUNK in text:
            try:
                return _from_json(base64.b64decode(text[TEXT_CHUNK]))
            except (ValueError, TypeError) as error:
                raise CardError(f"its {TEXT_CHUNK} text is damaged ({error})") from None
        data = read_from_pixels(image)
    if data is None:
        raise CardError("it is a picture without an embedding inside")
    return data


def plain_picture(title: str, size: int = 512) -> Image.Image:
    """A neutral picture with the embedding's name on it, for a card made without a preview."""
    picture = Image.new("RGB", (size, size), (214, 210, 200))
    draw = ImageDraw.Draw(picture)
    draw.text((size // 16, size // 2), title, fill=(40, 40, 40), font_size=size // 12)
    return picture


def card_bytes(data: dict, picture: Image.Image) -> bytes:
    """A lossless PNG of `picture` carrying `data` in its pixels and in its text chunk."""
    info = PngImagePlugin.PngInfo()
    info.add_text(TEXT_CHUNK, base64.b64encode(_to_json(data).encode()).decode("ascii"), zip=True)  # zTXt: PIL (and so A1111) inflates it
    out = io.BytesIO()
    embed_in_pixels(picture, data).save(out, "PNG", pnginfo=info)
    return out.getvalue()
