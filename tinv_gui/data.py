"""Training pictures: reading them safely, making them RGB, cropping them to a square or to
their aspect-ratio bucket, their masks and captions, concept folders with their repeats, prompt
templates, and the order a run draws them in."""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MASK_SUFFIX = ".mask.png"  # photo.mask.png beside photo.jpg: white where the subject is
# Refuse before decoding anything claiming more pixels than this: a "decompression bomb" is a
# small file that would expand to gigabytes in memory.
MAX_PIXELS = 40_000_000
# kohya's concept folders: "10_closeups" holds pictures that each count 10 times per epoch.
CONCEPT_FOLDER = re.compile(r"^(\d+)_(.+)$")
MAX_REPEATS = 1000
BUCKET_MAX_RATIO = 4  # a bucket's long side is at most 4 times its short side (kohya: 256 to 1024 at 512 px)

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
    """One training picture: RGB, cropped to its training size (a square, or its bucket); its
    caption if it has one; and how many times it counts per epoch."""

    path: str
    image: Image.Image
    caption: str | None = None
    # Where the crop came from, which SDXL is conditioned on: the picture's (height, width)
    # before scaling, and the (top, left) corner of the crop cut from the scaled picture.
    original_size: tuple[int, int] | None = None
    crop_top_left: tuple[int, int] = (0, 0)
    repeats: int = 1
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


def bucket_step(resolution: int, multiple: int = 8) -> int:
    """The grid bucket sides snap to: 64 pixels as in kohya and OneTrainer (latents a multiple of 8,
    what SD's UNet divides them by); below 512 px an eighth of the resolution (the demo model's
    64 px still gets several shapes), rounded down to a multiple of `multiple` and never below it:
    the family's size_multiple, 8 (the VAE's factor), or 16 for SD 3.x and Flux.1, whose
    transformers take latents in 2x2 patches (an odd latent side cannot be cut into them)."""
    return max(multiple, min(64, resolution // 8 // multiple * multiple))


def bucket_sizes(resolution: int, multiple: int = 8) -> list[tuple[int, int]]:
    """(width, height) of every bucket at `resolution`: for each width on the grid
    (bucket_step), the tallest height on the grid that keeps width x height at most resolution²,
    long side at most BUCKET_MAX_RATIO times the short one; and the resolution's square."""
    step = bucket_step(resolution, multiple)
    area = resolution * resolution
    side = resolution // multiple * multiple  # the resolution's own square, as without buckets
    sizes = {(side, side)}
    for width in range(step, BUCKET_MAX_RATIO * resolution + 1, step):
        height = area // width // step * step
        if height >= step and max(width, height) <= BUCKET_MAX_RATIO * min(width, height):
            sizes |= {(width, height), (height, width)}
    return sorted(sizes)


def nearest_bucket(width: int, height: int, sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest the picture's (compared as logarithms, so 2:1 and
    1:2 are equally far from square); of equally near ones, the largest."""
    ratio = math.log(width / height)
    return min(sizes, key=lambda s: (abs(math.log(s[0] / s[1]) - ratio), -s[0] * s[1]))


def crop_box(width: int, height: int, target: tuple[int, int]) -> tuple[float, float, float, float]:
    """(left, top, right, bottom), in the picture's own pixels, of the centered part that fills
    `target` (width, height) when scaled: what training keeps of the picture."""
    scale = max(target[0] / width, target[1] / height)
    kept_width, kept_height = target[0] / scale, target[1] / scale
    left, top = (width - kept_width) / 2, (height - kept_height) / 2
    return left, top, left + kept_width, top + kept_height


def training_size(width: int, height: int, size: int, buckets: bool, multiple: int) -> tuple[int, int]:
    """(width, height) a picture trains at: its nearest bucket at `size` (sides multiples of
    `multiple`, the model family's size_multiple), or the square. Training (load_dataset) and the
    Dataset tab's preview both ask it, with the same inputs."""
    return nearest_bucket(width, height, bucket_sizes(size, multiple)) if buckets else (size, size)


def fit_to(image: Image.Image, target: tuple[int, int]) -> tuple[Image.Image, tuple[int, int]]:
    """The picture scaled to fill `target` (width, height) and center-cropped by the remainder, and
    the (top, left) corner of that crop in the scaled picture's pixels (SDXL's crop conditioning)."""
    box = crop_box(image.width, image.height, target)
    scale = target[0] / (box[2] - box[0])
    return image.resize(target, Image.Resampling.BICUBIC, box=box), (round(box[1] * scale), round(box[0] * scale))


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
        if not _has_alpha(path):  # read from the header: most pictures are not decoded twice
            return None
        mask = _decode(path).convert("RGBA").getchannel("A")
    return None if mask.getextrema() == (255, 255) else mask


def _has_alpha(path: Path) -> bool:
    try:
        with Image.open(path) as probe:
            return probe.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in probe.info
    except Exception:  # noqa: BLE001 - open_image names what is wrong with the file
        return False


def is_picture_name(name: str) -> bool:
    """A picture's file name (a mask file, photo.mask.png, is not a picture of its own)."""
    return Path(name).suffix.lower() in IMAGE_SUFFIXES and not name.lower().endswith(MASK_SUFFIX)


def concept_repeats(folder: Path) -> int | None:
    """N for a concept folder named N_name (kohya's layout), else None."""
    match = CONCEPT_FOLDER.match(folder.name)
    if not match:
        return None
    repeats = int(match.group(1))
    if not 1 <= repeats <= MAX_REPEATS:
        raise ValueError(f"{folder}: a concept folder's number is how often its pictures count (1 to {MAX_REPEATS}), not {repeats}; rename it")
    return repeats


def _pictures_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if is_picture_name(p.name) and p.is_file())


def find_pictures(source: str | Path | list, repeats: int = 1) -> list[tuple[Path, int]]:
    """(picture file, times it counts per epoch) from folders or picture files. A folder's own
    pictures (sorted) and files given count `repeats` times; a folder's subfolders named N_name
    (kohya's concept folders: 10_closeups/, 2_wide/) add their pictures counting N times each.
    Other subfolders are not read."""
    sources = [source] if isinstance(source, (str, Path)) else list(source)
    if not sources:
        raise ValueError("no pictures given; add at least one")
    found: list[tuple[Path, int]] = []
    for item in map(Path, sources):
        if not item.exists():
            raise ValueError(f"{item} does not exist; give a folder of pictures or picture files")
        if not item.is_dir():
            found.append((item, repeats))
            continue
        before = len(found)
        found += [(p, repeats) for p in _pictures_in(item)]
        for folder in sorted(p for p in item.iterdir() if p.is_dir()):
            concept = concept_repeats(folder)
            if concept is not None:
                found += [(p, concept) for p in _pictures_in(folder)]
        if len(found) == before:
            raise ValueError(f"no pictures in {item} (looked for {', '.join(IMAGE_SUFFIXES)}, and in its N_name concept folders)")
    return found


def find_images(source: str | Path | list) -> list[Path]:
    """Picture files from folders (with their N_name concept folders) or an explicit list of files."""
    return [path for path, _ in find_pictures(source)]


def read_caption(path: Path) -> str | None:
    """The caption in a sidecar text file with the picture's name (photo.jpg -> photo.txt), if any."""
    sidecar = path.with_suffix(".txt")
    if sidecar.is_file():
        text = sidecar.read_text(encoding="utf-8", errors="replace").strip()
        return text or None
    return None


def load_dataset(source, size: int, min_side: int | None = None, buckets: bool = False, repeats: int = 1, multiple: int = 8) -> list[TrainImage]:
    """Load every picture of `source` (find_pictures) as an RGB image, with its caption and repeats:
    the centered square of `size` pixels, or with `buckets` the picture scaled to fill its nearest
    aspect-ratio bucket (about size² pixels, sides multiples of `multiple`: the model family's
    size_multiple) and center-cropped by the remainder; its mask (if any) cut the same way.

    `min_side` defaults to half the working size: a smaller picture would be blown up into blur.
    Raises ImageError for the first picture that cannot be used.
    """
    min_side = size // 2 if min_side is None else min_side
    images = []
    for path, times in find_pictures(source, repeats):
        picture = open_image(path, min_side)
        target = training_size(picture.width, picture.height, size, buckets, multiple)
        cropped, corner = fit_to(picture, target)
        mask = open_mask(path)
        images.append(TrainImage(
            str(path), cropped, read_caption(path), (picture.height, picture.width), corner, times, None if mask is None else fit_to(mask, target)[0]
        ))
    return images


def describe_sizes(images: list[TrainImage]) -> str:
    """'64x64 (3 pictures), 88x40 (1 picture)': the sizes a run trains at."""
    counts: dict[tuple[int, int], int] = {}
    for image in images:
        counts[image.image.size] = counts.get(image.image.size, 0) + 1
    return ", ".join(f"{w}x{h} ({n} picture{'s' if n > 1 else ''})" for (w, h), n in sorted(counts.items()))


def fill_template(template: str, placeholder: str) -> str:
    """Put the placeholder into a template ('a photo of a {}')."""
    return template.replace("{}", placeholder)


def validation_prompts(prompts: list[str] | None, style: str) -> list[str]:
    """The prompts previews draw and checkpoints are scored with ({} for the word): the user's,
    else the first training template of the style."""
    return [p for p in (prompts or []) if p.strip()] or [TEMPLATES[style][0]]


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


def picture_batches(shapes: list, repeats: list[int], batch: int, rng: random.Random):
    """Batches of picture indices for ever, epoch after epoch. In an epoch each picture is drawn
    `repeats[i]` times; a batch holds pictures of one shape (one bucket), topped up from its own
    bucket when the bucket's draws do not fill the last batch; the batches of all buckets come in
    a shuffled order."""
    buckets: dict = {}
    for index, (shape, times) in enumerate(zip(shapes, repeats)):
        buckets.setdefault(tuple(shape), []).extend([index] * times)
    while True:
        epoch = []
        for draws in buckets.values():
            order = rng.sample(draws, len(draws))
            order += [draws[i] for i in sample_indices(len(draws), -len(order) % batch, rng)]
            epoch += [order[i : i + batch] for i in range(0, len(order), batch)]
        rng.shuffle(epoch)
        yield from epoch


def sample_indices(count: int, batch: int, rng: random.Random) -> list[int]:
    """`batch` indices into `count` items, each used once before any repeats (epoch-like)."""
    order: list[int] = []
    while len(order) < batch:
        block = list(range(count))
        rng.shuffle(block)
        order.extend(block)
    return order[:batch]
