"""Training pictures: reading them safely, making them RGB and square, their masks and captions,
prompt templates."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MASK_SUFFIX = ".mask.png"  # photo.mask.png beside photo.jpg: white where the subject is
# Refuse before decoding anything claiming more pixels than this: a "decompression bomb" is a
# small file that would expand to gigabytes in memory.
MAX_PIXELS = 40_000_000

# The object and style prompt families of the textual inversion paper's training code.
OBJECT_TEMPLATES = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
)
STYLE_TEMPLATES = (
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a good painting in the style of {}",
    "a close-up painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
)
TEMPLATES = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}


class ImageError(ValueError):
    """A picture cannot be used; the message names the file and what to do."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{Path(path).name}: {problem}")


@dataclass
class TrainImage:
    """One training picture: RGB, square, at the working size; and its caption if it has one."""

    path: str
    image: Image.Image
    caption: str | None = None
    # Where the square came from, which SDXL is conditioned on: the picture's (height, width)
    # before scaling, and the (top, left) corner of the square cut from the scaled picture.
    original_size: tuple[int, int] | None = None
    crop_top_left: tuple[int, int] = (0, 0)
    # Where the subject is ("L", the image's size and crop; 255 the subject, 0 the rest), from the
    # picture's transparency or its mask file; None: the whole picture counts.
    mask: Image.Image | None = None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: transparency over white, 16/32-bit scaled down, CMYK converted."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        if image.mode == "F":
            top = max(float(values.max()), 1e-8) if values.max() > 1 else 1.0
        image = Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P" or image.mode in ("LA", "PA", "RGBa", "La") or "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def center_square(image: Image.Image, size: int) -> Image.Image:
    """Scale the shorter side to `size` and cut the centered square."""
    return ImageOps.fit(image, (size, size), method=Image.Resampling.BICUBIC, centering=(0.5, 0.5))


def center_square_corner(width: int, height: int, size: int) -> tuple[int, int]:
    """(top, left) of the square `center_square` cuts, in the pixels of the scaled picture."""
    scale = size / min(width, height)
    return round((height * scale - size) / 2), round((width * scale - size) / 2)


def _decode(path: Path) -> Image.Image:
    """Decode a picture file safely (header checked before decoding, EXIF orientation applied),
    in its own mode. Raises ImageError naming the file for anything that is not a usable picture."""
    try:
        with Image.open(path) as probe:
            width, height = probe.size
            if width * height > MAX_PIXELS:
                raise ImageError(path, f"claims {width}x{height} pixels, more than the {MAX_PIXELS // 1_000_000} megapixels allowed; scale it down first")
            probe.load()
            return ImageOps.exif_transpose(probe)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(path, "file not found") from None
    except UnidentifiedImageError:
        raise ImageError(path, "not a picture Pillow can read (PNG, JPEG, WebP, BMP, GIF or TIFF expected)") from None
    except Image.DecompressionBombError:
        raise ImageError(path, "too many pixels (a possible decompression bomb); scale it down first") from None
    except Exception as error:  # noqa: BLE001 - any failure decoding untrusted bytes means a damaged file
        raise ImageError(path, f"damaged or truncated picture ({type(error).__name__}: {error})") from None


def open_image(path: str | Path, min_side: int = 0) -> Image.Image:
    """Open a picture safely: header checked before decoding, EXIF orientation applied, RGB.

    Raises ImageError naming the file for anything that is not a usable picture.
    """
    path = Path(path)
    image = _decode(path)
    try:
        image = to_rgb(image)
    except Exception as error:  # noqa: BLE001 - a mode Pillow cannot convert means a damaged file
        raise ImageError(path, f"damaged or truncated picture ({type(error).__name__}: {error})") from None
    if min(image.size) < min_side:
        raise ImageError(path, f"is {image.size[0]}x{image.size[1]}; pictures need at least {min_side} pixels on the shorter side")
    return image


def mask_path(path: str | Path) -> Path:
    """Where a picture's mask file lives: photo.mask.png beside photo.jpg."""
    path = Path(path)
    return path.with_name(path.stem + MASK_SUFFIX)


def open_mask(path: str | Path) -> Image.Image | None:
    """The picture's mask ("L", the picture's size, 255 where the subject is): its mask file
    (photo.mask.png; its brightness), else its transparency (alpha channel); None when it has
    neither, or a mask that keeps everything. Raises ImageError for a mask that does not fit."""
    path = Path(path)
    sidecar = mask_path(path)
    if sidecar.is_file():
        mask = _decode(sidecar).convert("L")
        size = _decode(path).size
        if mask.size != size:
            raise ImageError(sidecar, f"is {mask.size[0]}x{mask.size[1]} but {path.name} is {size[0]}x{size[1]}; a mask must be the size of its picture")
    else:
        image = _decode(path)
        if image.mode not in ("RGBA", "LA", "PA", "RGBa", "La") and "transparency" not in image.info:
            return None
        mask = image.convert("RGBA").getchannel("A")
    return None if mask.getextrema() == (255, 255) else mask


def is_picture_name(name: str) -> bool:
    """A picture's file name (a mask file, photo.mask.png, is not a picture of its own)."""
    return Path(name).suffix.lower() in IMAGE_SUFFIXES and not name.lower().endswith(MASK_SUFFIX)


def find_images(source: str | Path | list) -> list[Path]:
    """Picture files from a folder (sorted, not recursive) or an explicit list of files."""
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        files = sorted(p for p in Path(source).iterdir() if is_picture_name(p.name) and p.is_file())
        if not files:
            raise ValueError(f"no pictures in {source} (looked for {', '.join(IMAGE_SUFFIXES)})")
        return files
    if isinstance(source, (str, Path)):
        if not Path(source).exists():
            raise ValueError(f"{source} does not exist; give a folder of pictures or picture files")
        return [Path(source)]
    files = [Path(p) for p in source]
    if not files:
        raise ValueError("no pictures given; add at least one")
    return files


def read_caption(path: Path) -> str | None:
    """The caption in a sidecar text file with the picture's name (photo.jpg -> photo.txt), if any."""
    sidecar = path.with_suffix(".txt")
    if sidecar.is_file():
        text = sidecar.read_text(encoding="utf-8", errors="replace").strip()
        return text or None
    return None


def load_dataset(source, size: int, min_side: int | None = None) -> list[TrainImage]:
    """Load every picture of `source` as a square RGB image of `size` pixels, with its caption
    and its mask (cut the same way).

    `min_side` defaults to half the working size: a smaller picture would be blown up into blur.
    Raises ImageError for the first picture that cannot be used.
    """
    min_side = size // 2 if min_side is None else min_side
    images = []
    for path in find_images(source):
        picture = open_image(path, min_side)
        corner = center_square_corner(picture.width, picture.height, size)
        mask = open_mask(path)
        square_mask = None if mask is None else center_square(mask, size)
        images.append(TrainImage(str(path), center_square(picture, size), read_caption(path), (picture.height, picture.width), corner, square_mask))
    return images


def fill_template(template: str, placeholder: str) -> str:
    """Put the placeholder into a template ('a photo of a {}')."""
    return template.replace("{}", placeholder)


def caption_prompt(caption: str, placeholder: str, style: str) -> str:
    """A caption with the placeholder put in: where it says '{}' or the placeholder already, as is;
    otherwise the placeholder is named at the front (objects) or as the style (styles)."""
    if "{}" in caption:
        return fill_template(caption, placeholder)
    if placeholder in caption:
        return caption
    return f"{caption}, in the style of {placeholder}" if style == "style" else f"a photo of {placeholder}, {caption}"


def training_prompts(images: list[TrainImage], placeholder: str, style: str = "object", use_captions: bool = False) -> list[str]:
    """The prompts a run samples from: the templates of the style, or every picture's caption."""
    if style not in TEMPLATES:
        raise ValueError(f"style must be one of {', '.join(TEMPLATES)}, not {style!r}")
    if use_captions:
        missing = [Path(i.path).name for i in images if not i.caption]
        if missing:
            raise ValueError(f"captions were asked for but these pictures have none: {', '.join(missing[:5])}")
        return [caption_prompt(i.caption, placeholder, style) for i in images]
    return [fill_template(t, placeholder) for t in TEMPLATES[style]]


def sample_indices(count: int, batch: int, rng: random.Random) -> list[int]:
    """`batch` indices into `count` items, each used once before any repeats (epoch-like)."""
    order: list[int] = []
    while len(order) < batch:
        block = list(range(count))
        rng.shuffle(block)
        order.extend(block)
    return order[:batch]
