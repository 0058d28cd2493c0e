"""The Dataset tab's work: taking uploads into a visitor's folder, checking every picture, and
showing each one as the model will see it (whole, with the part training crops away dimmed and
what its mask leaves out darkened), with its problem next to it when it has one.

A zip's kohya concept folders (N_name: its pictures count N times) are kept as such, inside the
visitor's pictures folder, where training finds them (data.find_pictures); a picture's name is
then "N_name/picture.png"."""

from __future__ import annotations

import json
import shutil
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..data import (
    IMAGE_SUFFIXES,
    MASK_SUFFIX,
    ImageError,
    concept_repeats,
    crop_box,
    find_pictures,
    mask_path,
    open_image,
    open_mask,
    read_caption,
    training_size,
)
from ..files import atomic_write_text
from .host import host_number
from .workspace import Workspace, sanitize_filename, unique_path

# Smaller than this a picture is refused; smaller than SOFT_SIDE it is kept with a warning.
MIN_SIDE = 64
SOFT_SIDE = 256
MAX_ZIP_MEMBERS = 500
# Pictures one visitor may keep: textual inversion wants 3 to 20; this bounds a shared server's disk.
MAX_PICTURES = host_number("TINV_GUI_MAX_PICTURES")
MAX_MEMBER_BYTES = 50 * 1024 * 1024
# Bytes one upload may unpack from zips (a small zip can hold gigabytes of members).
MAX_UNPACKED_BYTES = host_number("TINV_GUI_MAX_UNPACKED_MB") * 1024 * 1024
# Pictures are kept at most this large on their shorter side: training crops a square at 512
# (SD 1.x) to 1024 (SDXL), so anything larger only costs disk, memory and every gallery redraw.
MAX_SIDE = host_number("TINV_GUI_PICTURE_SIDE")
MAX_REFUSED = 50  # refused uploads listed (their names and reasons; their bytes are not kept)
PROBLEMS_FILE = "problems.json"
# The resolution the crops are shown at when the model's own is not known yet: SD 1.x's. Bucket
# shapes are the same at every resolution from 64 to 512 px that is a multiple of 64.
CROP_RESOLUTION = 512
CROP_MULTIPLE = 8  # SD 1.x's size_multiple, with its resolution
FRAME = (79, 70, 229)  # the kept part's outline: the page's indigo
MASKED_OUT = (40, 30, 60)  # what a mask leaves out is shown darkened towards this
DUPLICATE_BITS = 8  # of the 256 of a fingerprint: resizing or re-encoding flips a few


@dataclass
class Picture:
    """One uploaded picture, as the Dataset tab lists it."""

    name: str
    path: Path
    problem: str | None = None  # why it is refused; None when it will be trained on
    note: str | None = None  # a warning that does not stop training
    caption: str = ""
    repeats: int = 1  # how often it counts per epoch: N in its concept folder N_name


def _fingerprint(image: Image.Image) -> np.ndarray:
    """A 16x16 average hash: nearly equal for the same picture saved again, resized or re-encoded."""
    small = np.asarray(image.convert("L").resize((16, 16), Image.Resampling.BOX), dtype=np.float32)
    return (small > small.mean()).ravel()


def _duplicate_of(fingerprint: np.ndarray, known: dict[str, np.ndarray]) -> str | None:
    """The name of a known picture within a few bits of `fingerprint`, if any."""
    for name, other in known.items():
        if np.count_nonzero(fingerprint != other) <= DUPLICATE_BITS:
            return name
    return None


def _problems(ws: Workspace) -> dict[str, str]:
    path = ws.rejected / PROBLEMS_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _refuse(ws: Workspace, source: Path, name: str, problem: str) -> Picture:
    """Note why an upload was refused (its name and the reason, the last MAX_REFUSED of them)
    and delete it: a refused file is never kept, so never served either."""
    source.unlink(missing_ok=True)
    problems = _problems(ws)
    stem, suffix = Path(name).stem, Path(name).suffix
    n = 2
    while name in problems:
        name, n = f"{stem}-{n}{suffix}", n + 1
    problems[name] = problem
    problems = dict(list(problems.items())[-MAX_REFUSED:])
    atomic_write_text(ws.rejected / PROBLEMS_FILE, json.dumps(problems, indent=1))
    return Picture(name, ws.rejected / name, problem=problem)


def _concept_folder(member: str) -> str:
    """The kohya concept folder (N_name) a zip member lies in, sanitized; "" for any other
    folder (its pictures join the visitor's own, as "2024_holiday" with N past 1000 does)."""
    parent = sanitize_filename(Path(member).parent.name, "")
    try:
        return parent if parent and concept_repeats(Path(parent)) is not None else ""
    except ValueError:  # a number out of range: a name that only looks like a concept's
        return ""


def _unpack_zip(archive: Path, into: Path, budget: list[int]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Pictures and caption files of a zip, written under sanitized names (in their concept
    folder N_name, when in one), within `budget[0]` bytes (what is left of the upload's
    allowance, updated); and (name, problem) of members left packed."""
    out, skipped = [], []
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.infolist() if not m.is_dir() and "__MACOSX" not in m.filename]
            for member in members[:MAX_ZIP_MEMBERS]:
                suffix = Path(member.filename).suffix.lower()
                if suffix not in IMAGE_SUFFIXES + (".txt",) or Path(member.filename).name.startswith("."):
                    continue
                name, folder = sanitize_filename(member.filename), _concept_folder(member.filename)
                limit = min(MAX_MEMBER_BYTES, budget[0])
                with zf.open(member) as src:  # read at most the limit: a member's declared size can lie
                    data = src.read(limit + 1)
                if len(data) > limit:
                    why = "larger than 50 MB" if limit == MAX_MEMBER_BYTES else f"not unpacked: one upload may unpack at most {MAX_UNPACKED_BYTES // 2**20} MB"
                    skipped.append((name, why))
                    continue
                budget[0] -= len(data)
                (into / folder).mkdir(exist_ok=True)
                target = unique_path(into / folder, name)
                target.write_bytes(data)
                out.append(target)
    except (zipfile.BadZipFile, OSError) as error:
        raise ImageError(archive, f"not a readable zip file ({error})") from None
    return out, skipped


def _keep(image: Image.Image, source: Path, target: Path) -> Path:
    """Store an accepted picture at `target` (returned): downscaled once, on arrival, to MAX_SIDE
    on its shorter side when larger (as PNG unless it was a JPEG or WebP), else as uploaded."""
    if min(image.size) <= MAX_SIDE:
        source.replace(target)
        return target
    scale = MAX_SIDE / min(image.size)
    smaller = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.LANCZOS)
    kind = Image.registered_extensions().get(target.suffix.lower())
    if kind not in ("JPEG", "WEBP"):
        kind, target = "PNG", unique_path(target.parent, target.with_suffix(".png").name)
    smaller.save(target, format=kind, quality=95)
    source.unlink()
    return target


def add_files(ws: Workspace, uploads: list[str]) -> list[Picture]:
    """Copy uploaded files (pictures, zips of pictures, caption .txt files) into the visitor's
    folder under sanitized names and check each picture. Returns the pictures added; refused
    ones keep their problem (unreadable, too small, duplicate) and are not trained on."""
    incoming = ws.root / "incoming"
    incoming.mkdir(exist_ok=True)
    staged: list[Path] = []
    added: list[Picture] = []
    budget = [MAX_UNPACKED_BYTES]
    for upload in uploads or []:
        upload = Path(upload)
        target = unique_path(incoming, sanitize_filename(upload.name))
        if upload.suffix.lower() == ".zip":
            try:
                unpacked, skipped = _unpack_zip(upload, incoming, budget)
            except ImageError as error:
                added.append(_refuse(ws, target, target.name, error.problem))
                continue
            staged += unpacked
            added += [_refuse(ws, incoming / name, name, why) for name, why in skipped]
            continue
        target.write_bytes(upload.read_bytes())
        staged.append(target)

    def stem(path: Path) -> str:  # "N_name/photo" in a concept folder, else "photo"
        return path.relative_to(incoming).with_suffix("").as_posix()

    captions = {stem(p): p for p in staged if p.suffix == ".txt"}
    masks = {stem(p)[: -len(Path(MASK_SUFFIX).stem)]: p for p in staged if p.name.lower().endswith(MASK_SUFFIX)}
    known = {picture.name: _fingerprint(open_image(picture.path)) for picture in _kept(ws)}
    kept = {Path(name).with_suffix("").as_posix(): ws.pictures / name for name in known}  # a mask may come after its picture
    for path in staged:
        if path.suffix == ".txt" or path.name.lower().endswith(MASK_SUFFIX):
            continue
        name = path.relative_to(incoming).as_posix()
        if len(known) >= MAX_PICTURES:
            added.append(_refuse(ws, path, name, f"not added: at most {MAX_PICTURES} pictures can be kept; remove some first"))
            continue
        try:
            image = open_image(path)
        except ImageError as error:
            added.append(_refuse(ws, path, name, error.problem))
            continue
        if min(image.size) < MIN_SIDE:
            added.append(_refuse(ws, path, name, f"too small ({image.size[0]}x{image.size[1]}); use pictures at least {MIN_SIDE} pixels on each side, ideally 512"))
            continue
        fingerprint = _fingerprint(image)
        original = _duplicate_of(fingerprint, known)
        if original:
            added.append(_refuse(ws, path, name, f"duplicate of {original}"))
            continue
        folder = ws.pictures / path.parent.relative_to(incoming)
        folder.mkdir(exist_ok=True)
        target = _keep(image, path, unique_path(folder, path.name))
        known[target.relative_to(ws.pictures).as_posix()] = fingerprint
        kept[stem(path)] = target
        if stem(path) in captions:
            captions[stem(path)].replace(target.with_suffix(".txt"))
        added.append(describe(ws, target))
    for picture, mask in masks.items():
        if picture not in kept:
            added.append(_refuse(ws, mask, mask.name, f"a mask without its picture: upload {picture}.png (or .jpg...) with it"))
            continue
        problem = _keep_mask(mask, kept[picture])
        if problem:
            added.append(_refuse(ws, mask, mask.name, problem))
    shutil.rmtree(incoming, ignore_errors=True)  # what was not kept
    return added


def _keep_mask(mask: Path, picture: Path) -> str | None:
    """Store an uploaded mask beside its kept picture (scaled as the picture was on arrival);
    or say why it cannot be used."""
    try:
        shape = open_image(mask)
        with Image.open(picture) as probe:
            size = probe.size
    except ImageError as error:
        return error.problem
    if abs(shape.width / shape.height - size[0] / size[1]) > 0.01:
        return f"is {shape.width}x{shape.height}, not the shape of {picture.name} ({size[0]}x{size[1]}); a mask must match its picture"
    shape.convert("L").resize(size, Image.Resampling.LANCZOS).save(mask_path(picture))
    mask.unlink()
    return None


def masked_view(image: Image.Image, mask: Image.Image | None) -> Image.Image:
    """The picture with what its mask leaves out darkened, as the Dataset tab shows a mask."""
    if mask is None:
        return image
    darkened = Image.blend(image, Image.new("RGB", image.size, MASKED_OUT), 0.7)
    return Image.composite(image, darkened, mask)


def describe(ws: Workspace, path: Path) -> Picture:
    """A picture in the training folder (or one of its concept folders), with its caption, its
    repeats and any warning."""
    name = path.relative_to(ws.pictures).as_posix()
    picture = Picture(name, path, caption=read_caption(path) or "", repeats=concept_repeats(path.parent) or 1)
    with Image.open(path) as probe:
        if min(probe.size) < SOFT_SIDE:
            picture.note = f"small ({probe.size[0]}x{probe.size[1]}): details will be soft"
    if mask_path(path).is_file():
        picture.note = "; ".join(filter(None, [picture.note, "masked (the darkened part counts less)"]))
    return picture


def _kept(ws: Workspace) -> list[Picture]:
    """The pictures training will find in the visitor's folder (data.find_pictures: its own,
    then those of its concept folders)."""
    try:
        found = find_pictures(ws.pictures)
    except ValueError:  # no pictures yet
        return []
    return [describe(ws, path) for path, _ in found]


def concepts_text(pictures: list[Picture]) -> str:
    """The concept folders among `pictures` and how often each one's pictures count, said plainly."""
    folders = Counter((p.name.split("/")[0], p.repeats) for p in pictures if "/" in p.name and not p.problem)
    return "; ".join(f"{folder}: {count} picture(s), each counting {repeats} times" for (folder, repeats), count in sorted(folders.items()))


def list_pictures(ws: Workspace) -> list[Picture]:
    """Every picture of the visitor: those to train on first, then the refused ones."""
    usable = _kept(ws)
    refused = [Picture(name, ws.rejected / name, problem=problem) for name, problem in sorted(_problems(ws).items())]
    return usable + refused


def crop_preview(image: Image.Image, box: tuple[float, float, float, float], size: int) -> Image.Image:
    """`image` whole, at most `size` pixels a side, with what lies outside `box` (in its own
    pixels) faded towards white and the box framed."""
    scale = min(1.0, size / max(image.size))
    shown = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.LANCZOS)
    left, top, right, bottom = (round(v * scale) for v in box)
    faded = Image.blend(shown, Image.new("RGB", shown.size, (255, 255, 255)), 0.65)
    faded.paste(shown.crop((left, top, right, bottom)), (left, top))
    ImageDraw.Draw(faded).rectangle((left, top, right - 1, bottom - 1), outline=FRAME, width=max(1, size // 128))
    return faded


def as_seen(picture: Picture, size: int = 256, buckets: bool = True, resolution: int = CROP_RESOLUTION, multiple: int = CROP_MULTIPLE):
    """(preview, (width, height) it trains at): the picture as training sees it, orientation fixed,
    RGB, shown whole with the part cut away to fill its square or bucket faded and what its mask
    (transparency or mask file) leaves out darkened. None if unreadable. `buckets`, `resolution`
    and `multiple` (the family's size_multiple) are training's inputs of data.training_size."""
    try:
        image = masked_view(open_image(picture.path), open_mask(picture.path))
    except ImageError:
        return None
    target = training_size(image.width, image.height, resolution, buckets, multiple)
    return crop_preview(image, crop_box(image.width, image.height, target), size), target


def gallery_items(
    ws: Workspace, size: int = 256, buckets: bool = True, resolution: int = CROP_RESOLUTION, multiple: int = CROP_MULTIPLE
) -> list[tuple[Image.Image, str]]:
    """(image, caption) pairs for the Dataset gallery: each picture with the crop it trains at
    (`buckets` and `resolution` as the training options say, `multiple` the model family's
    size_multiple); a refused one labelled with its problem."""
    items = []
    for picture in list_pictures(ws):
        seen = None if picture.problem else as_seen(picture, size, buckets, resolution, multiple)
        if seen is None:  # its bytes were not kept, or it became unreadable
            label = f"✗ {picture.name}: {picture.problem or 'cannot be read'}"
            image = Image.new("RGB", (size, size), (235, 220, 220))
        else:
            image, (width, height) = seen
            counted = f" ×{picture.repeats}" if picture.repeats > 1 else ""
            label = f"{picture.name}{counted} → {width}x{height}" + (f" ⚠ {picture.note}" if picture.note else "")
        items.append((image, label))
    return items


def caption_rows(ws: Workspace) -> list[list[str]]:
    """[name, caption] for every picture that will be trained on."""
    return [[p.name, p.caption] for p in list_pictures(ws) if not p.problem]


def save_captions(ws: Workspace, rows) -> int:
    """Write each edited caption next to its picture (photo.jpg -> photo.txt); returns how many."""
    saved = 0
    pictures = {p.name: p.path for p in _kept(ws)}  # a row names one of them, never a path of its own
    for row in rows or []:
        picture = pictures.get(str(row[0])) if len(row) >= 2 and row[0] else None
        if picture is None:
            continue
        caption = str(row[1] or "").strip()
        sidecar = picture.with_suffix(".txt")
        if caption:
            atomic_write_text(sidecar, caption + "\n")
            saved += 1
        else:
            sidecar.unlink(missing_ok=True)
    return saved


def clear(ws: Workspace) -> None:
    """Remove every picture, caption and refused upload of the visitor."""
    for folder in (ws.pictures, ws.rejected):
        for path in folder.iterdir():
            if path.is_dir():  # a concept folder
                shutil.rmtree(path)
            else:
                path.unlink()


def picture_paths(ws: Workspace) -> list[Path]:
    """The pictures training will use."""
    return [p.path for p in list_pictures(ws) if not p.problem]
